"""Generation throughput: `rlhf_jax.models.decode.generate` against Hugging Face `generate`.

Same weights (a random `transformers.GPTNeoForCausalLM` converted to Flax), same prompts, same batch,
same machine, one process. Both produce exactly `--new_tokens` tokens per row (ours: an EOS id that
never matches; HF: `min_new_tokens`), KV cache on for both. Ours is timed as it runs by default,
with the Flax decoding step instead of the feature-major one (`feature_major=False`; the default
on CPU for models over 64 MB) and with its scanned layers (`layer_loop=False`, the accelerator
default). Each is warmed up (compiled) first, then the repetitions alternate HF / ours / Flax step /
scanned so that load from other processes hits all alike; the median time per call gives new
tokens per second. Results: bench/RESULTS.md.

  python bench/bench_generate.py                  # both shapes, greedy and sampled, torch 2 threads
  taskset -c 1 python bench/bench_generate.py --torch_threads=1   # both on one core
"""

import argparse
import functools
import os
import statistics

import jax
import numpy as np
import torch
import transformers

from common import machine_description, timed
from rlhf_jax.models import decode
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf

# GPT-Neo 125M: hidden 768, 12 alternating global/local layers, 12 heads, window 256.
SHAPES = {
    "125m": dict(hidden_size=768, num_layers=12, num_heads=12, vocab_size=50257,
                 attention_types=[[["global", "local"], 6]], window_size=256),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, vocab_size=1024,
                 attention_types=[[["global", "local"], 1]], window_size=256),
}


def build_models(shape: str, seed: int = 0):
  """(torch model in eval mode, Flax module, Flax params) with identical weights."""
  vocab = SHAPES[shape]["vocab_size"]
  hf_config = transformers.GPTNeoConfig(max_position_embeddings=2048, bos_token_id=vocab - 1,
                                        eos_token_id=vocab - 1, **SHAPES[shape])
  torch.manual_seed(seed)
  torch_model = transformers.GPTNeoForCausalLM(hf_config).eval()
  config = gpt_neo.GPTNeoConfig.from_hf_dict(hf_config.to_dict())
  tensors = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  params = jax.device_put(hf.hf_to_flax(tensors, config, source=f"random {shape}"))
  return torch_model, gpt_neo.GPTNeo(config), params


def bench_shape(shape: str, *, batch: int, prompt_length: int, new_tokens: int, reps: int) -> list[dict]:
  """Times greedy and sampled generation for one shape; prints and returns one row per mode."""
  torch_model, model, params = build_models(shape)
  vocab = model.config.vocab_size
  eos = model.config.eos_token_id
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, vocab - 1, (batch, prompt_length)).astype(np.int32)  # No EOS inside.
  mask = np.ones_like(prompts)
  torch_prompts, torch_mask = torch.from_numpy(prompts).long(), torch.from_numpy(mask).long()

  rows = []
  for mode in ("greedy", "sampled"):
    settings = decode.SamplingSettings(
        max_new_tokens=new_tokens, temperature=0.0 if mode == "greedy" else 1.0,
        eos_token_id=-1, pad_token_id=eos)  # -1: never matches, so all rows run to the end.
    key = jax.random.key(0)
    # Ours as it runs by default (on CPU: a loop over unstacked layers, feature-major above 64 MB),
    # with the Flax decoding step, and with the scanned layers (the default on accelerators), to
    # show what those choices are worth here.
    def ours(layer_loop, feature_major):
      return jax.block_until_ready(decode.generate(
          model, params, prompts, mask, key, settings, layer_loop=layer_loop,
          feature_major=feature_major))

    variants = {"ours": functools.partial(ours, None, None),
                "flax_step": functools.partial(ours, None, False),
                "scan": functools.partial(ours, False, False)}
    # HF's sampling defaults to top_k=50; 0 turns it off, as in our settings.
    sampling_flags = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if mode == "sampled" \
        else dict(do_sample=False)

    def theirs():
      with torch.no_grad():
        return torch_model.generate(
            torch_prompts, attention_mask=torch_mask, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, pad_token_id=eos, eos_token_id=eos, use_cache=True,
            **sampling_flags)

    compile_s = {name: timed(fn) for name, fn in variants.items()}  # The first call compiles.
    our_tokens = np.asarray(variants["ours"]().tokens)
    hf_tokens = theirs()[:, prompt_length:].numpy()
    assert our_tokens.shape == hf_tokens.shape == (batch, new_tokens)
    np.testing.assert_array_equal(np.asarray(variants["scan"]().tokens),
                                  np.asarray(variants["flax_step"]().tokens))
    if mode == "greedy":  # Sampled draws of the feature-major step differ by rounding only.
      np.testing.assert_array_equal(np.asarray(variants["flax_step"]().tokens), our_tokens)

    runs = {"hf": theirs, **variants}
    times = {name: [] for name in runs}
    for _ in range(reps):  # Alternate, so a burst of load from elsewhere hits all alike.
      for name, fn in runs.items():
        times[name].append(timed(fn))
    tokens = batch * new_tokens
    median = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    rows.append(dict(
        shape=shape, mode=mode, tok_s={name: tokens / t for name, t in median.items()},
        ratio=median["hf"] / median["ours"], scan_ratio=median["hf"] / median["scan"],
        flax_step_ratio=median["hf"] / median["flax_step"],
        best_ratio=best["hf"] / best["ours"], median_s=median, compile_s=compile_s,
        greedy_agreement=float((our_tokens == hf_tokens).mean()) if mode == "greedy" else None))
    print(_format_row(rows[-1]), flush=True)
  return rows


HEADER = ("| shape | mode | HF tok/s | ours tok/s | ours / HF | ours, Flax step: tok/s (/ HF) "
          "| ours, scanned layers: tok/s (/ HF) | best-of-N ours / HF "
          "| s per call: HF / ours / Flax step / scanned | compile s: ours / scanned "
          "| same greedy tokens as HF |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _format_row(r: dict) -> str:
  agreement = "" if r["greedy_agreement"] is None else f"{100 * r['greedy_agreement']:.0f}%"
  tok_s, median, compile_s = r["tok_s"], r["median_s"], r["compile_s"]
  return (f"| {r['shape']} | {r['mode']} | {tok_s['hf']:.0f} | {tok_s['ours']:.0f} | "
          f"**{r['ratio']:.1f}x** | {tok_s['flax_step']:.0f} ({r['flax_step_ratio']:.1f}x) | "
          f"{tok_s['scan']:.0f} ({r['scan_ratio']:.1f}x) | {r['best_ratio']:.1f}x | "
          f"{median['hf']:.2f} / {median['ours']:.2f} / {median['flax_step']:.2f} / "
          f"{median['scan']:.2f} | "
          f"{compile_s['ours']:.1f} / {compile_s['scan']:.1f} | {agreement} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="tiny,125m", help="comma-separated: " + ", ".join(SHAPES))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt_length", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--torch_threads", type=int, default=2)
  args = parser.parse_args()
  shapes = args.shapes.split(",")
  if unknown := set(shapes) - set(SHAPES):
    parser.error(f"--shapes: unknown {sorted(unknown)}; choose from {', '.join(SHAPES)}")
  torch.set_num_threads(args.torch_threads)
  print(machine_description())
  print(f"batch {args.batch}, prompt {args.prompt_length} tokens, {args.new_tokens} new tokens, "
        f"median of {args.reps} alternating repetitions; load average before: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
  print(HEADER)
  for shape in shapes:
    bench_shape(shape, batch=args.batch, prompt_length=args.prompt_length,
                new_tokens=args.new_tokens, reps=args.reps)
  print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
