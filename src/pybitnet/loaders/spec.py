"""MODEL specs -> what they name: the one resolver behind `load`, `load_weights` and `load_tokenizer`.

A spec is, tried in this order:
    builtin                     the small trained model shipped inside the package (the default MODEL)
    synthetic:PRESET[:LAYERS]   random weights of seed 0 and the synthetic tokenizer (pybitnet.synthetic)
    an existing path            a Hugging Face directory (config.json + *.safetensors) or a .gguf file
    OWNER/NAME                  a Hugging Face Hub repo id, fetched with huggingface_hub (from its local
                                cache when offline, HF_HUB_OFFLINE=1)
Errors say what the spec was taken for and what was tried.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig, preset
from ..errors import CheckpointError, InputError

SYNTHETIC_PREFIX = "synthetic:"
BUILTIN = "builtin"  # the spec of the shipped model, and the default wherever a MODEL may be omitted
# what the Hub accepts as a repo id: OWNER/NAME of letters, digits, '-', '_', '.'
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# files a model repo needs: weights, configs, tokenizer; never optimizer states or other formats
HUB_FILE_PATTERNS = ("*.json", "*.safetensors", "*.gguf", "tokenizer.model")


@dataclass(frozen=True)
class ModelSpec:
    text: str  # the spec as given
    kind: str  # "hf" (directory), "gguf" (file) or "synthetic"
    path: Path | None = None  # the directory or file, for "hf" and "gguf"
    config: ModelConfig | None = None  # the preset's shape, for "synthetic"
    repo_id: str | None = None  # set when the path came from the Hugging Face Hub


def parse_synthetic(spec: str) -> ModelConfig:
    """The config of `synthetic:PRESET[:LAYERS]`; ConfigError listing presets, InputError for bad LAYERS."""
    name, _, layers = spec[len(SYNTHETIC_PREFIX):].partition(":")
    config = preset(name)
    if not layers:
        return config
    if not layers.isdigit() or int(layers) < 1:
        raise InputError(f"{spec}: LAYERS in synthetic:PRESET[:LAYERS] must be an integer >= 1, got {layers!r}")
    return config.replace(num_layers=int(layers))


def resolve_model_spec(spec: str | os.PathLike) -> ModelSpec:
    """What `spec` names; downloads a Hub repo's model files (or finds them in the local cache)."""
    text = os.fspath(spec)
    if text == BUILTIN:
        from ..builtin import builtin_model_path

        return ModelSpec(text, "hf", builtin_model_path())
    if text.startswith(SYNTHETIC_PREFIX):
        return ModelSpec(text, "synthetic", config=parse_synthetic(text))
    path = Path(text)
    if path.exists():
        return _local(text, path)
    if REPO_ID.match(text) and not text.lower().endswith(".gguf"):
        directory = _hub_snapshot(text)
        resolved = _local(text, _model_in(directory, text))
        return ModelSpec(text, resolved.kind, resolved.path, repo_id=text)
    raise CheckpointError(f"{text}: no such file or directory (and not synthetic:PRESET[:LAYERS] or a Hugging Face "
                          "repo id OWNER/NAME)")


def names_a_model(text: str) -> bool:
    """Whether `text` reads as a MODEL spec, without resolving it (nothing is downloaded or loaded): `builtin`,
    a synthetic spec, a directory, a .gguf file, or a repo id that is no file here. The command line asks
    this of a positional argument that may be a MODEL or a prompt or document."""
    if text == BUILTIN or text.startswith(SYNTHETIC_PREFIX):
        return True
    path = Path(text)
    if path.is_dir() or path.suffix.lower() == ".gguf":
        return True
    return not path.exists() and REPO_ID.match(text) is not None


def _local(text: str, path: Path) -> ModelSpec:
    if path.is_dir():
        return ModelSpec(text, "hf", path)
    if path.suffix.lower() == ".gguf":
        return ModelSpec(text, "gguf", path)
    raise CheckpointError(f"{path}: not a model directory (config.json + *.safetensors) or a .gguf file")


def _model_in(directory: Path, repo_id: str) -> Path:
    """The model a downloaded repo holds: the directory when it has config.json, else its one .gguf file."""
    if (directory / "config.json").is_file():
        return directory
    ggufs = sorted(directory.rglob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        names = ", ".join(str(g.relative_to(directory)) for g in ggufs)
        raise CheckpointError(f"{repo_id}: the repo holds several .gguf files ({names}); download one and pass its path")
    raise CheckpointError(f"{repo_id}: the repo has neither config.json nor a .gguf file")


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(f"{repo_id}: no such path, and loading a Hugging Face repo id needs the "
                              "huggingface_hub package (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(HUB_FILE_PATTERNS)))
    except LocalEntryNotFoundError as err:
        raise CheckpointError(f"{repo_id}: no such path; as a Hugging Face repo id it is not in the local cache "
                              f"and could not be downloaded (offline?): {_first_line(err)}") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise CheckpointError(f"{repo_id}: no such path; as a Hugging Face repo id it could not be fetched: "
                              f"{_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
