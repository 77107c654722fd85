"""`pybitnet serve MODEL --ray`: the command hands its model, settings and replica counts to Ray Serve."""

from __future__ import annotations

import torch

from pybitnet.distributed import scoring, serving


class _FakeRay:
    def __init__(self):
        self.init_calls = []

    def init(self, **kwargs):
        self.init_calls.append(kwargs)


def _patch(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AUTO")  # the command would otherwise restart itself to set it
    ray, runs = _FakeRay(), []
    monkeypatch.setattr(scoring, "require_ray", lambda: ray)
    monkeypatch.setattr(serving, "run", lambda model, **kwargs: runs.append((model, kwargs)))
    return ray, runs


def test_serve_ray_passes_replicas_settings_and_cluster_address(cli, monkeypatch):
    ray, runs = _patch(monkeypatch)
    done = cli("serve", "synthetic:tiny", "--ray", "--replicas", "3", "--address", "auto", "--port", "8123",
               "--max-batch", "4", "--threads", "1", "--name", "tiny")
    assert done.code == 0, done.err
    assert ray.init_calls and ray.init_calls[0]["address"] == "auto"
    (model, kwargs), = runs
    assert model == "synthetic:tiny"
    assert kwargs["replicas"] == 3 and kwargs["autoscaling_config"] is None and kwargs["port"] == 8123
    assert kwargs["settings"].max_batch == 4 and kwargs["settings"].model_name == "tiny"
    assert kwargs["threads_per_replica"] == 1 and kwargs["dtype"] == torch.float32 and kwargs["blocking"]


def test_serve_ray_autoscales_between_replicas_and_max_replicas(cli, monkeypatch):
    _, runs = _patch(monkeypatch)
    done = cli("serve", "--ray", "--replicas", "1", "--max-replicas", "4")  # the built-in model
    assert done.code == 0, done.err
    (model, kwargs), = runs
    assert model == "builtin" and kwargs["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4}


def test_serve_ray_refuses_fewer_max_replicas_than_replicas(cli, monkeypatch):
    _, runs = _patch(monkeypatch)
    done = cli("serve", "--ray", "--replicas", "3", "--max-replicas", "2")
    assert done.code == 1 and "--max-replicas 2 is below --replicas 3" in done.err and not runs
