"""pybitnet vs llama.cpp (through llama-cpp-python) on the same 2B-4T-shaped random model.

The model is exported to GGUF TQ2_0 with F16 token embeddings (tied output) by our writer, and both
engines load that one file; they process the same 512-token prompt and generate 32 tokens with the
same thread count; generation is timed after a DECODE_CONTEXT-token prompt. Two generation comparisons:
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
ROUNDS = 2


def _llama_cpp_times(path: str, tokens: list[int], threads: int) -> tuple[float, float]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=PROMPT + GENERATE + 8, n_batch=PROMPT, n_ubatch=PROMPT, n_threads=threads,
                n_threads_batch=threads, logits_all=False, verbose=False)
    llm.eval(tokens[:16])  # warm up
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    pp = time.perf_counter() - start
    tg = float("inf")
    for _ in range(ROUNDS):  # best round for both engines: the shared VM stalls now and then
        llm.n_tokens = DECODE_CONTEXT  # generate after the first DECODE_CONTEXT prompt tokens
        start = time.perf_counter()
        for i in range(GENERATE):
            llm.eval([tokens[i]])
        tg = min(tg, time.perf_counter() - start)
    llm.close() if hasattr(llm, "close") else None
    return PROMPT / pp, GENERATE / tg


def _pybitnet_times(model, tokens: list[int]) -> tuple[float, float]:
    prompt = torch.tensor([tokens])
    model.forward_full(prompt[:, :16], logits="last")  # warm up
    start = time.perf_counter()
    model.forward_full(prompt, logits="last")
    pp = time.perf_counter() - start
    return PROMPT / pp, _pybitnet_decode(model, tokens)


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


def _pybitnet_decode(model, tokens: list[int]) -> float:
    """Generation tokens/s after a DECODE_CONTEXT-token prefill, best of ROUNDS."""
    cache = model.new_cache(1, DECODE_CONTEXT + GENERATE + 1)
    model.prefill(torch.tensor([tokens[:DECODE_CONTEXT]]), cache)
    best = float("inf")
    for _ in range(ROUNDS):
        cache.lengths.fill_(DECODE_CONTEXT)
        start = time.perf_counter()
        for i in range(GENERATE):
            model.decode_step(torch.tensor([tokens[i]]), cache)
        best = min(best, time.perf_counter() - start)
    return GENERATE / best


def compare(layers: int = 30, threads: int = 2, seed: int = 0, preset_name: str = "bitnet-b1.58-2b-4t") -> dict:
    """The vs_llama_cpp entry of the benchmark JSON (or {"skipped": reason})."""
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
        model = pybitnet.load(path)  # F16 embeddings and head, as in the file
        ours_pp, ours_tg = _pybitnet_times(model, tokens)
        del model
        model = pybitnet.load(path, lm_head="int8")
        ours_tg_int8 = _pybitnet_decode(model, tokens)
        del model
        try:
            llama_pp, llama_tg = _llama_cpp_times(path, tokens, threads)
        except Exception as err:  # a llama.cpp build that refuses the file: say so in the results
            return {"skipped": f"llama.cpp could not run the TQ2_0 file: {type(err).__name__}: {err}"}
        try:
            _quantize_output(path, quantized_path, threads)
            llama_tg_q8 = _llama_cpp_times(quantized_path, tokens, threads)[1]
        except Exception as err:
            llama_tg_q8 = None
            quantized_note = f"{type(err).__name__}: {err}"
        else:
            quantized_note = "llama.cpp output tensor Q8_0; pybitnet lm_head='int8'"
    import llama_cpp

    result = {"llama_cpp_python": llama_cpp.__version__, "format": "TQ2_0", "embeddings": "F16", "threads": threads,
              "layers": layers, "decode_context": DECODE_CONTEXT,
              "llama_pp512_tok_s": llama_pp, "pybitnet_pp512_tok_s": ours_pp, "pp512_ratio": ours_pp / llama_pp,
              "llama_tg32_tok_s": llama_tg, "pybitnet_tg32_tok_s": ours_tg, "tg32_ratio": ours_tg / llama_tg,
              "quantized_head": quantized_note, "pybitnet_tg32_int8_head_tok_s": ours_tg_int8}
    if llama_tg_q8 is not None:
        result.update({"llama_tg32_q8_output_tok_s": llama_tg_q8, "tg32_int8_head_vs_llama_q8_ratio": ours_tg_int8 / llama_tg_q8,
                       "tg32_int8_head_vs_llama_f16_ratio": ours_tg_int8 / llama_tg})
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
