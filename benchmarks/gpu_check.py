"""GPU check (issue 15): the bf16 mixed-precision training path on one GPU, on a random Llama-3.2-1B-shaped model.

    bash benchmarks/gpu_check_prepare.sh             # here, once: what the GPU machine lacks, into .gpu_deps/
    PYTHONPATH=src:.gpu_deps python benchmarks/gpu_check.py --out "$OUT"    # there (under 8 minutes on one GPU)
    python benchmarks/gpu_check.py --device cpu --tiny                    # its CPU twin (tests run it)

Rows: plain fine-tuning, fused QAT and torchao's QAT (8da4w, group 32) at batch 2 x 2048 through qatune's own
training loop (fp32 master weights, bf16 autocast), each its median step time after a warm-up step, tokens/s and
measured peak memory next to `tune estimate`'s figure for the same set-up. Then the fused QAT model is converted
to int4, saved, reloaded with plain transformers on the same device and its logits compared with the converted
model's. Random weights: no checkpoint to carry, and speed and memory do not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM

from qatune.planner import KNOWN_ARCHITECTURES, load_architecture, plan_memory
from qatune.quantization import convert_to_int4, fake_quantize_, resolve_quantizer, save_quantized
from qatune.training import TrainConfig, make_accelerator, train

MODEL = "meta-llama/Llama-3.2-1B-Instruct"  # its shape (planner's table); the weights are random


class RandomTokens(Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int):
        self.ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build(config, device: torch.device, quantizer: dict | None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if quantizer is not None:
        fake_quantize_(model, resolve_quantizer(quantizer))
    return model.to(device)


def train_row(name, config, quantizer, accelerator, args, out: Path) -> tuple[dict, torch.nn.Module]:
    step_starts: list[float] = []

    def on_step(model, step):  # before each optimizer step: synchronise so the wall clock measures the GPU's work
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        step_starts.append(time.perf_counter())

    model = build(config, accelerator.device, quantizer)
    cfg = TrainConfig(batch_size=args.batch_size, max_steps=args.steps, clip_grad_norm=1.0, log_every_n_steps=1)
    data = RandomTokens(args.batch_size * args.steps, args.seq_len, config.vocab_size)
    model, result = train(
        model, data, cfg=cfg, optimizer_cfg={"_component_": "torch.optim.AdamW", "lr": 1e-5}, scheduler_cfg=None,
        accelerator=accelerator, output_dir=out / name, seed=0, on_step=on_step, run_name=name,
    )  # fmt: skip
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    step_starts.append(time.perf_counter())
    step_s = statistics.median(b - a for a, b in zip(step_starts[1:-1], step_starts[2:], strict=True))
    plan = plan_memory(
        config.to_dict(), num_gpus=1, strategy="single", dtype="bf16", optimizer="adamw", batch_size=args.batch_size,
        seq_len=args.seq_len, activation_checkpointing=False, qat=quantizer is not None,
        qat_scheme=(quantizer or {}).get("scheme", "8da4w"), group_size=(quantizer or {}).get("group_size", 32),
    )  # fmt: skip
    row = {
        "run": name, "step_s": step_s, "tokens_per_s": args.batch_size * args.seq_len / step_s,
        "peak_gb": result.peak_memory_bytes / 1e9, "estimate_gb": plan["bytes"]["total"] / 1e9,
        "final_loss": result.final_loss,
        "weights_dtype": str({p.dtype for p in model.parameters()}),
    }  # fmt: skip
    return row, model


def int4_round_trip(model: torch.nn.Module, quantizer: dict, device: torch.device) -> dict:
    """Convert the trained fused-QAT model, save it, reload it with plain transformers on `device`, compare logits."""
    q = resolve_quantizer(quantizer)
    convert_to_int4(model, q)
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        save_quantized(model, None, Path(d) / "int4")
        saved_s = time.perf_counter() - t
        size = sum(f.stat().st_size for f in (Path(d) / "int4").iterdir())
        reloaded = AutoModelForCausalLM.from_pretrained(Path(d) / "int4", device_map=str(device))
        with torch.no_grad():
            after = reloaded(input_ids=ids).logits.float()
    rel = ((after - before).norm() / before.norm()).item()
    weight = type(reloaded.model.layers[0].self_attn.q_proj.weight).__name__
    exact = bool(torch.equal(before, after))
    return {"save_s": saved_s, "size_gb": size / 1e9, "logits_rel_l2": rel, "bit_exact": exact, "weight": weight}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="2 small layers (the CPU twin)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="gpu_check_")))
    args = ap.parse_args()
    device = torch.device(args.device)
    config = load_architecture(KNOWN_ARCHITECTURES[MODEL])
    if args.tiny:
        config.update(dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64, vocab_size=1024))  # fmt: skip
        args.seq_len, args.steps = min(args.seq_len, 128), min(args.steps, 3)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(json.dumps(env))
    accelerator = make_accelerator(device, 1, str(args.out), mixed_precision="bf16")
    fused = {"scheme": "8da4w", "group_size": 32, "fused": True}
    rows, failures, trained = [], [], None
    for name, quantizer in (("plain", None), ("fused_qat", fused), ("torchao_qat", {**fused, "fused": False})):
        try:
            row, model = train_row(name, config, quantizer, accelerator, args, args.out)
            rows.append(row)
            if name == "fused_qat":
                trained = model
            else:
                del model
        except Exception as e:  # one failing row must not hide the others
            failures.append({"run": name, "error": traceback.format_exc()[-3000:]})
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    round_trip = None
    if trained is not None:
        try:
            round_trip = int4_round_trip(trained, fused, device)
        except Exception as e:
            failures.append({"run": "int4_round_trip", "error": traceback.format_exc()[-3000:]})
            print(f"int4 round trip: {type(e).__name__}: {e}", file=sys.stderr)
    plain = next((r["tokens_per_s"] for r in rows if r["run"] == "plain"), None)
    print("\n| run | step s | tokens/s | vs plain | peak GB | estimate GB | final loss | weights |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / plain:.2f}x" if plain else "-"
        print(f"| {r['run']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {ratio} | {r['peak_gb']:.2f} | "
              f"{r['estimate_gb']:.2f} | {r['final_loss']:.4f} | {r['weights_dtype']} |")  # fmt: skip
    if round_trip is not None:
        print(f"\nint4 round trip: {json.dumps(round_trip)}")
    (args.out / "gpu_check.json").write_text(json.dumps({"env": env, "rows": rows, "int4": round_trip,
                                                          "failures": failures}, indent=1))  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
