"""GPU check (issues 15, 26): the bf16 mixed-precision training path on one GPU, on a random Llama-3.2-1B-shaped model.

    bash benchmarks/gpu_check_prepare.sh     # here, once: wheels of what the GPU machine lacks, into .gpu_deps/
    bash benchmarks/gpu_check.sh             # there, carry=[".gpu_deps"] (unpacks them, --preflight, then this)
    python benchmarks/gpu_check.py --device cpu --tiny                    # its CPU twin (tests run it)

Rows: plain fine-tuning, fused QAT and torchao's QAT (8da4w, group 32) at batch 2 x 2048 through qatune's own
training loop (fp32 master weights, bf16 autocast), each its median step time after a warm-up step, tokens/s and
measured peak memory next to `tune estimate`'s figure for the same set-up. Then the fused QAT model is converted
to int4, saved, reloaded with plain transformers on the same device and its logits compared with the converted
model's. Random weights: no checkpoint to carry, and speed and memory do not depend on the values.

Also on the device: the fused fake-quant kernels against torchao's own fake quant, forward and gradients bit for bit
(inductor on CUDA rewrites division; qatune.fused_fake_quant compiles with eager division rounding), and each row
starts with no earlier row's model alive (its peak memory is its own).
"""

from __future__ import annotations

import argparse
import copy
import gc
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
    # A copy: converting a model to int4 edits its config (untied embeddings, quantization_config), and from_config
    # keeps the object it is given, so a later row would build another (untied) model.
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
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
        "final_loss": result.final_loss, "losses": result.losses,
        "weights_dtype": str({p.dtype for p in model.parameters()}),
    }  # fmt: skip
    return row, model


def models_alive() -> int:
    """Models still referenced somewhere (an earlier row's would count in this row's peak memory)."""
    from transformers import PreTrainedModel

    gc.collect()
    return sum(isinstance(o, PreTrainedModel) for o in gc.get_objects())


def fused_matches_torchao(config, device: torch.device) -> dict:
    """Forward logits and every gradient of a 2-layer model of `config`'s shape, fused fake quant vs torchao's, fp32
    and under bf16 autocast, 8da4w and 4w: bit for bit, on `device`'s own kernels (compiled on CPU and CUDA)."""
    small = type(config).from_dict({**config.to_dict(), "num_hidden_layers": 2})
    ids = torch.randint(0, small.vocab_size, (2, 256), generator=torch.Generator().manual_seed(2)).to(device)
    checks = {}
    for scheme in ("8da4w", "4w"):
        for autocast in (False, True):
            outs = []
            for fused in (True, False):
                model = build(small, device, {"scheme": scheme, "group_size": 32, "fused": fused})
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    logits = model(input_ids=ids).logits
                logits.float().square().mean().backward()
                outs.append([logits.detach(), *(p.grad for p in model.parameters())])
                del model
            equal = all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
            checks[f"{scheme}{'_bf16_autocast' if autocast else ''}"] = equal
    return checks


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


CARRIED = ("torchao", "omegaconf", "antlr4-python3-runtime", "gguf", "transformers", "huggingface-hub", "tokenizers",
           "safetensors")  # fmt: skip


def check_wheels(directory: Path) -> int:
    """The wheels for the GPU machine (CPython 3.12, x86_64): one of each CARRIED package, each requirement of one on
    another satisfied, transformers within this project's pin. Exit 1 with one line per problem."""
    import re
    import tomllib
    import zipfile

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename

    wheels = {}
    for w in sorted(directory.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(w.name)
        wheels[canonicalize_name(name)] = (version, w, {t.interpreter for t in tags}, {t.platform for t in tags})
    problems = [f"missing wheel: {p}" for p in CARRIED if canonicalize_name(p) not in wheels]
    for name, (version, path, interpreters, platforms) in wheels.items():
        if not interpreters & {"py3", "cp312", "cp310", "cp39", "cp38"} or not any(
            p == "any" or p.endswith("x86_64") for p in platforms
        ):
            problems.append(f"{path.name}: not for CPython 3.12 on x86_64")
        with zipfile.ZipFile(path) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for line in re.findall(r"^Requires-Dist: (.*)$", meta, flags=re.M):
            req = Requirement(line)
            if req.marker is not None and "extra" in str(req.marker):
                continue
            dep = canonicalize_name(req.name)
            if dep in wheels and not req.specifier.contains(wheels[dep][0], prereleases=True):
                problems.append(f"{name} {version} requires {req}, carried {wheels[dep][0]}")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pin = next(Requirement(d) for d in pyproject["project"]["dependencies"] if d.startswith("transformers"))
    if "transformers" in wheels and not pin.specifier.contains(wheels["transformers"][0]):
        problems.append(f"transformers {wheels['transformers'][0]} is outside the project's pin {pin}")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    print(f"{len(wheels)} wheels checked: " + ", ".join(f"{n} {v[0]}" for n, v in wheels.items()))
    return 1 if problems else 0


def preflight(device: str) -> int:
    """On the GPU machine, in seconds: every import gpu_check needs, their versions, the device."""
    import importlib

    versions = {}
    for module in ("torch", "torchao", "transformers", "accelerate", "omegaconf", "gguf", "safetensors", "tokenizers"):
        versions[module] = getattr(importlib.import_module(module), "__version__", "?")
    importlib.import_module("qatune.quantization")
    importlib.import_module("qatune.training")
    print(json.dumps(versions))
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device visible", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="2 small layers (the CPU twin)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="gpu_check_")))
    ap.add_argument("--preflight", action="store_true", help="only check the imports and versions (seconds)")
    ap.add_argument("--check-wheels", type=Path, help="check a directory of wheels for the GPU machine and exit")
    args = ap.parse_args()
    if args.check_wheels:
        return check_wheels(args.check_wheels)
    if args.preflight:
        return preflight(args.device)
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
    rows, failures, round_trip, kernels = [], [], None, None
    try:
        kernels = fused_matches_torchao(config, device)
        if not all(kernels.values()):
            failures.append({"run": "fused_kernels", "error": f"fused != torchao: {kernels}"})
    except Exception as e:
        failures.append({"run": "fused_kernels", "error": traceback.format_exc()[-3000:]})
        print(f"fused kernels: {type(e).__name__}: {e}", file=sys.stderr)
    for name, quantizer in (("plain", None), ("fused_qat", fused), ("torchao_qat", {**fused, "fused": False})):
        alive = models_alive()
        try:
            row, model = train_row(name, config, quantizer, accelerator, args, args.out)
            rows.append(row | {"models_alive_at_start": alive})
            if name == "fused_qat":  # now, so that no trained model waits on the device during the next row
                round_trip = int4_round_trip(model, fused, device)
            del model
        except Exception as e:  # one failing row must not hide the others
            failures.append({"run": name, "error": traceback.format_exc()[-3000:]})
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    losses = {r["run"]: r["losses"] for r in rows}
    if {"fused_qat", "torchao_qat"} <= set(losses) and losses["fused_qat"] != losses["torchao_qat"]:
        failures.append({"run": "fused_vs_torchao", "error": f"losses differ: {losses}"})
    if round_trip is not None and not round_trip["bit_exact"]:
        failures.append({"run": "int4_round_trip", "error": f"reloaded logits differ: {round_trip}"})
    plain = next((r["tokens_per_s"] for r in rows if r["run"] == "plain"), None)
    print("\n| run | step s | tokens/s | vs plain | peak GB | estimate GB | final loss | weights |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / plain:.2f}x" if plain else "-"
        print(f"| {r['run']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {ratio} | {r['peak_gb']:.2f} | "
              f"{r['estimate_gb']:.2f} | {r['final_loss']:.4f} | {r['weights_dtype']} |")  # fmt: skip
    if round_trip is not None:
        print(f"\nint4 round trip: {json.dumps(round_trip)}")
    print(f"fused == torchao, forward and gradients, bit for bit: {json.dumps(kernels)}")
    print(f"models alive at each row's start: {[r['models_alive_at_start'] for r in rows]}")
    for f in failures:
        print(f"FAILED {f['run']}: {f['error'].strip().splitlines()[-1]}")
    (args.out / "gpu_check.json").write_text(json.dumps({"env": env, "rows": rows, "int4": round_trip,
                                                          "fused_kernels": kernels, "failures": failures},
                                                         indent=1))  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
