"""pybitnet vs llama.cpp (through llama-cpp-python) on the same 2B-4T-shaped random model.

The model is exported to GGUF TQ2_0 with F16 token embeddings (tied output) by our writer, and both
engines load that one file; they process the same 512-token prompt and generate 32 tokens with the
same thread count; generation is timed after a DECODE_CONTEXT-token prompt, the engines' rounds
interleaved (best of ROUNDS each). Two generation comparisons:
  exact      both engines with the F16 output projection (pybitnet's default exact head);
  quantized  llama.cpp with its output tensor quantized to Q8_0 (llama_model_quantize), pybitnet
             with lm_head="int8" (a per-row int8 copy of the head): both lossy, in the same way. llama.cpp's `bitnet` graph hard-codes
SiLU, so it computes silu where the model says relu²: the work per token is the same, the numbers
are not (correctness against llama.cpp is checked on SiLU models in tests/test_gguf_llamacpp.py).
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

PROMPT = 512
DECODE_CONTEXT = 128  # generation starts after this many prompt tokens
GENERATE = 32
ROUNDS = 3  # decode rounds per engine, interleaved across engines; the best round of each counts


class _LlamaCpp:
    """One llama.cpp engine on a file: the prompt timed once, then decode rounds on demand."""

    def __init__(self, path: str, tokens: list[int], threads: int):
        from llama_cpp import Llama

        self.tokens = tokens
        self.llm = Llama(model_path=path, n_ctx=PROMPT + GENERATE + 8, n_batch=PROMPT, n_ubatch=PROMPT,
                         n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
        self.llm.eval(tokens[:16])  # warm up
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(tokens)
        self.prefill_tok_s = PROMPT / (time.perf_counter() - start)

    def decode_round(self) -> float:
        self.llm.n_tokens = DECODE_CONTEXT  # generate after the first DECODE_CONTEXT prompt tokens
        start = time.perf_counter()
        for i in range(GENERATE):
            self.llm.eval([self.tokens[i]])
        return time.perf_counter() - start

    def close(self) -> None:
        self.llm.close() if hasattr(self.llm, "close") else None


class _Pybitnet:
    """pybitnet on the same file: the prompt timed once (forward_full, logits of the last token), then
    decode rounds after a DECODE_CONTEXT-token prefill."""

    def __init__(self, model, tokens: list[int], time_prefill: bool = True):
        self.model, self.tokens = model, tokens
        prompt = torch.tensor([tokens])
        self.prefill_tok_s = None
        if time_prefill:
            model.forward_full(prompt[:, :16], logits="last")  # warm up
            start = time.perf_counter()
            model.forward_full(prompt, logits="last")
            self.prefill_tok_s = PROMPT / (time.perf_counter() - start)
        self.cache = model.new_cache(1, DECODE_CONTEXT + GENERATE + 1)
        model.prefill(prompt[:, :DECODE_CONTEXT], self.cache)
        model.decode_step(torch.tensor([tokens[0]]), self.cache)  # warm up

    def decode_round(self) -> float:
        self.cache.lengths.fill_(DECODE_CONTEXT)
        start = time.perf_counter()
        for i in range(GENERATE):
            self.model.decode_step(torch.tensor([self.tokens[i]]), self.cache)
        return time.perf_counter() - start


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


def compare(layers: int = 30, threads: int = 2, seed: int = 0, preset_name: str = "bitnet-b1.58-2b-4t") -> dict:
    """The vs_llama_cpp entry of the benchmark JSON (or {"skipped": reason}).

    All four engines (pybitnet exact and int8 head, llama.cpp F16 and Q8_0 output) are loaded first;
    their decode rounds then run in turn, round after round, so a drift of the machine's memory
    bandwidth during the run touches every engine alike."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install -e .[llama])"}
    try:
        from pybitnet.loaders.gguf import write_gguf
    except ImportError as err:
        return {"skipped": f"no GGUF writer: {err}"}
    import pybitnet
    from pybitnet import preset
    from pybitnet.synthetic import random_weights

    torch.set_num_threads(threads)
    config = preset(preset_name).replace(num_layers=layers)
    tokens = torch.randint(0, config.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(seed)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model-tq2_0.gguf")
        quantized_path = os.path.join(tmp, "model-tq2_0-q8_0-output.gguf")
        write_gguf(path, config, random_weights(config, seed), "tq2_0", embed_type="f16")
        engines = {"pybitnet": _Pybitnet(pybitnet.load(path), tokens),  # F16 embeddings and head, as in the file
                   "pybitnet_int8_head": _Pybitnet(pybitnet.load(path, lm_head="int8"), tokens, time_prefill=False)}
        try:
            engines["llama"] = _LlamaCpp(path, tokens, threads)
        except Exception as err:  # a llama.cpp build that refuses the file: say so in the results
            return {"skipped": f"llama.cpp could not run the TQ2_0 file: {type(err).__name__}: {err}"}
        try:
            _quantize_output(path, quantized_path, threads)
            engines["llama_q8_output"] = _LlamaCpp(quantized_path, tokens, threads)
        except Exception as err:
            quantized_note = f"{type(err).__name__}: {err}"
        else:
            quantized_note = "llama.cpp output tensor Q8_0; pybitnet lm_head='int8'"
        best = {name: float("inf") for name in engines}
        for _ in range(ROUNDS):
            for name, engine in engines.items():
                best[name] = min(best[name], engine.decode_round())
        for engine in engines.values():
            if isinstance(engine, _LlamaCpp):
                engine.close()
    import llama_cpp

    tg = {name: GENERATE / seconds for name, seconds in best.items()}
    ours_pp, llama_pp = engines["pybitnet"].prefill_tok_s, engines["llama"].prefill_tok_s
    result = {"llama_cpp_python": llama_cpp.__version__, "format": "TQ2_0", "embeddings": "F16", "threads": threads,
              "layers": layers, "decode_context": DECODE_CONTEXT, "decode_rounds": ROUNDS,
              "llama_pp512_tok_s": llama_pp, "pybitnet_pp512_tok_s": ours_pp, "pp512_ratio": ours_pp / llama_pp,
              "llama_tg32_tok_s": tg["llama"], "pybitnet_tg32_tok_s": tg["pybitnet"],
              "tg32_ratio": tg["pybitnet"] / tg["llama"], "quantized_head": quantized_note,
              "pybitnet_tg32_int8_head_tok_s": tg["pybitnet_int8_head"]}
    if "llama_q8_output" in tg:
        result.update({"llama_tg32_q8_output_tok_s": tg["llama_q8_output"],
                       "tg32_int8_head_vs_llama_q8_ratio": tg["pybitnet_int8_head"] / tg["llama_q8_output"],
                       "tg32_int8_head_vs_llama_f16_ratio": tg["pybitnet_int8_head"] / tg["llama"]})
    return result


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="pybitnet vs llama.cpp on one 2B-4T-shaped TQ2_0 file")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="bitnet-b1.58-2b-4t")
    args = parser.parse_args()
    print(json.dumps(compare(args.layers, args.threads, preset_name=args.preset), indent=2))
