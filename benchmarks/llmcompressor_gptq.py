"""llm-compressor's GPTQ of a float HF Llama: the reference benchmarks/gptq_crosscheck.py compares qatune's GPTQ with.

Runs INSIDE .venv-llmcompressor (`make llmcompressor`; llm-compressor 0.14.0.1, compressed-tensors 0.19.0,
transformers 5.17, torch 2.13 CPU); it does not import qatune:

    .venv-llmcompressor/bin/python benchmarks/llmcompressor_gptq.py --model DIR --calibration ids.pt --out OUT

`--calibration` is a torch.save'd int64 tensor [n, seq_len] of token ids, given to `oneshot` as a `datasets.Dataset`
of input_ids / attention_mask (already tokenized: llm-compressor skips its own tokenization), all n rows, in order.
The recipe: GPTQModifier, int4 symmetric per-group weights (group --group-size), targets Linear, ignore lm_head,
dampening_frac 0.01, block_size 128, actorder None; the sequential pipeline. OUT gets the compressed-tensors
`pack-quantized` checkpoint (save_compressed=True) and llmcompressor_gptq.json (wall times, versions).

What llm-compressor 0.14.0.1 does for this recipe (read in its installed source; paths under site-packages/):
- Group scales: computed ONCE per linear, from its weights as they are before GPTQ touches them (static groups),
  not per group from the error-updated weights (the original GPTQ code's default). At the end of a layer's
  calibration pass `GPTQModifier.on_sequential_epoch_end` runs `observe(modules, base_name="weight")`
  (llmcompressor/modifiers/gptq/base.py:235), then `compress_module_list` reads `weight_observer.get_qparams()`
  (base.py:313) and passes those scales into `quantize_weight` (base.py:339); inside the column loop
  `column_scale_window` only gathers the fixed scale of each column's group (modifiers/gptq/helpers.py:343-423,
  used at modifiers/gptq/gptq_quantize.py:157). The observer is `memoryless_minmax` (weights always; calibration.py:67
  in llmcompressor/modifiers/quantization/): min/max over each [row, group] (observers/min_max.py:70-74 on the
  (1, rows, groups, group_size) view of observers/helpers.py:77-79).
- Scale formula, symmetric int4: amax / ((qmax - qmin) / 2) = amax / 7.5, with amax = max(|min|, |max|) of the group
  (min clamped <= 0, max >= 0) (compressed_tensors/quantization/utils/helpers.py:71-87); a zero scale becomes the
  dtype's eps (helpers.py:116-127). Range [qmin, qmax] = [-8, 7] (helpers.py:203-206).
- Rounding: q = round(clamp(w / scale, -8, 7)) (torch.round: half to even), dequantized q * scale, zero point unused
  for symmetric (compressed_tensors/quantization/lifecycle/forward_helpers.py:186-202, quant_args.py:449-458).
  Note w / scale, not w * (1 / scale) as torchao's quantize_affine.
- Dampening: H += dampening_frac * mean(diag(H)) * I, after dead columns (diag 0) get diag 1 and a zero weight column
  (modifiers/gptq/helpers.py:296-308); then Hinv = upper Cholesky of (chol-inverse of chol(H)) (helpers.py:309-314).
  If Cholesky fails the module falls back to RTN (identity Hinv, helpers.py:315-321; logged at the end).
- Hessian: H = (2 / n) * sum x x^T in fp32, n = the number of calibration SEQUENCES seen (the batch dim), not tokens
  (helpers.py:40-76, prepare_batch helpers.py:101); a constant factor that dampening's relative form cancels.
- Column loop: lazy batches of block_size columns; per column error = (w - q) / Hinv[i, i], the rest of the block
  updated at once per column, the columns after the block by Err1 @ Hinv[block, rest] (gptq_quantize.py:95-123,
  167-183). fp32 throughout (GPTQ_PRECISION, helpers.py:18). On CPU the eager path runs (Triton needs CUDA).
- Pipeline: sequential (GPTQ needs data, so "independent" infers "sequential", pipelines/registry.py:56-58; passed
  explicitly here). Subgraphs = one LlamaDecoderLayer each (the model's _no_split_modules,
  utils/pytorch/module.py:166-168). For each layer: a calibration pass with hooks accumulating every linear's
  Hessian, then GPTQ of all its linears, then a second pass without hooks whose outputs feed the next layer
  (pipelines/sequential/pipeline.py:143-178, propagate_error=True by default, args/dataset_arguments.py:267).
  So layer i is calibrated on the outputs of layers < i already quantized (their weights hold the dequantized GPTQ
  values: update_batch_qparams, helpers.py:121-147), and WITHIN a layer all Hessians come from the float weights
  of that layer (q/k/v, o, gate/up, down all see inputs computed before any of the layer is quantized; fake quant
  is off during calibration, DisableQuantization at pipeline.py:117).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


def calibration_dataset(path: str):
    """The token ids [n, seq_len] as a tokenized `datasets.Dataset` (input_ids, attention_mask)."""
    import datasets

    ids = torch.load(path)
    if ids.dim() != 2 or ids.dtype != torch.int64:
        raise SystemExit(f"{path}: expected an int64 tensor [n, seq_len], got {ids.dtype} {tuple(ids.shape)}")
    rows = ids.tolist()
    return datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}), ids.shape


def gptq_recipe(group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier

    weights = QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size, actorder=None
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return GPTQModifier(
        config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=0.01, block_size=128, actorder=None
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="float Hugging Face Llama checkpoint directory")
    parser.add_argument("--calibration", required=True, help="torch.save'd int64 tensor [n, seq_len] of token ids")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--out", required=True, help="output directory (compressed-tensors pack-quantized)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot

    dataset, shape = calibration_dataset(args.calibration)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    start = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=gptq_recipe(args.group_size),
        num_calibration_samples=shape[0],
        max_seq_length=shape[1],
        shuffle_calibration_samples=False,
        pipeline="sequential",
    )
    oneshot_s = time.perf_counter() - start
    start = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    save_s = time.perf_counter() - start
    info = {
        "oneshot_s": round(oneshot_s, 1),
        "save_s": round(save_s, 1),
        "samples": shape[0],
        "seq_len": shape[1],
        "group_size": args.group_size,
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
    Path(args.out, "llmcompressor_gptq.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
