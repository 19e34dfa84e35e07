"""qatune's GPTQ against llm-compressor's on the same float model and calibration ids: perplexity within 1%.

    make llmcompressor                              # .venv-llmcompressor (once, ~1.5 min)
    python benchmarks/gptq_crosscheck.py [--model DIR] [--samples 32] [--seq-len 512] [--work-dir DIR]

Steps: the float model (default SmolLM2-135M-Instruct from qatune's cache); calibration ids = the first --samples
windows of the Python-docs train split packed at --seq-len (qatune.data.build_dataset), saved as ids.pt;
benchmarks/llmcompressor_gptq.py in .venv-llmcompressor (its docstring says what llm-compressor's GPTQ does), its
pack-quantized checkpoint unpacked here with compressed_tensors into the float model (codes x scales; lm_head float);
qatune's GPTQ (qatune.gptq.gptq_quantize_, torchao int4 weights) and RTN (quantize_ptq_) on the same scheme (4w,
int4 symmetric, group --group-size, lm_head skipped). Perplexity of float / RTN / both GPTQs: the recipe's eval
(gptq protocol, 128-token windows, the first 8 Python-docs validation documents) and a second domain (the GPL-3
text). Also: the share of weight codes both GPTQs agree on, and each linear's relative output error
||x W_q^T - x W^T|| / ||x W^T|| on float-model inputs (4 held-out windows: Python-docs validation, --seq-len
tokens), averaged over linears.

--work-dir keeps ids.pt and llm-compressor's output: a second run with the same ids reuses that output (its wall time
comes from the saved json). qatune runs twice: `static_groups=true` (llm-compressor's algorithm: every group's scale
from the original weights) and its default (each group's scale from the weights GPTQ has updated so far). Exit
status 1 when the like-for-like one (static groups) is more than --tolerance (1%) away from llm-compressor's
in-domain.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

from qatune.data import DatasetConfig, build_dataset, load_texts  # noqa: E402
from qatune.evaluation import perplexity  # noqa: E402
from qatune.models import download, load_model, load_tokenizer  # noqa: E402
from qatune.quantization import quantize_ptq_, resolve_quantizer  # noqa: E402
from qatune.report import markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LLMC_PYTHON = ROOT / ".venv-llmcompressor" / "bin" / "python"
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # in qatune's cache: ~/.cache/qatune/models/<this id>
GPL = Path("/usr/share/common-licenses/GPL-3")
Codes = dict[str, tuple[torch.Tensor, torch.Tensor]]  # linear name -> (int8 codes [out, in], scales [out, in / g])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help=f"float HF checkpoint directory (default: {DEFAULT_MODEL})")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--work-dir", default=None, help="keeps ids.pt and llm-compressor's output (default: a temp dir)")
    p.add_argument("--tolerance", type=float, default=0.01, help="allowed relative perplexity difference")
    return p.parse_args()


def calibration_ids(tokenizer, samples: int, seq_len: int) -> torch.Tensor:
    """The first `samples` packed windows of the Python-docs train split, [samples, seq_len] int64."""
    data = build_dataset(DatasetConfig(name="python_docs", split="train"), tokenizer, seq_len)
    if len(data) < samples:
        raise SystemExit(f"python_docs train holds {len(data)} windows of {seq_len} tokens, fewer than {samples}")
    return data.input_ids[:samples].clone()


def run_llmcompressor(model_dir: Path, ids: torch.Tensor, group_size: int, work: Path) -> tuple[Path, dict]:
    """llm-compressor's GPTQ in its own venv -> (output dir, its json + subprocess wall time); reused when done."""
    out, ids_path = work / "llmcompressor", work / "ids.pt"
    info_path = out / "llmcompressor_gptq.json"
    if ids_path.exists() and info_path.exists() and torch.equal(torch.load(ids_path), ids):
        info = json.loads(info_path.read_text())
        if info.get("group_size") == group_size and info.get("model") == str(model_dir):
            print(f"reusing llm-compressor's output in {out}", file=sys.stderr)
            return out, info
    if not LLMC_PYTHON.exists():
        raise SystemExit(f"{LLMC_PYTHON} is missing: run `make llmcompressor` first")
    shutil.rmtree(out, ignore_errors=True)
    torch.save(ids, ids_path)
    script = ROOT / "benchmarks" / "llmcompressor_gptq.py"
    cmd = [str(LLMC_PYTHON), str(script), "--model", str(model_dir), "--calibration", str(ids_path)]
    cmd += ["--group-size", str(group_size), "--out", str(out)]
    log = work / "llmcompressor.log"
    print(f"llm-compressor GPTQ (log: {log}) ...", file=sys.stderr)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"llm-compressor failed (exit {proc.returncode}); last lines of {log}:\n" + tail(log))
    info = {**json.loads(info_path.read_text()), "subprocess_s": round(wall, 1), "model": str(model_dir)}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return out, info


def tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def read_llmcompressor(out: Path) -> tuple[Codes, dict[str, torch.Tensor]]:
    """Its pack-quantized checkpoint -> ({linear: (codes, scales)}, {other tensor name: tensor})."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    codes: Codes = {}
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        name = key.removesuffix(".weight_packed")
        shape = torch.Size(tensors.pop(f"{name}.weight_shape").tolist())
        unpacked = unpack_from_int32(tensors.pop(key), 4, shape)
        codes[name] = (unpacked.to(torch.int8), tensors.pop(f"{name}.weight_scale").float())
        tensors.pop(f"{name}.weight_zero_point", None)
    return codes, tensors


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return codes.float() * scales.repeat_interleave(codes.shape[1] // scales.shape[1], dim=1)


def with_weights(model: nn.Module, codes: Codes) -> nn.Module:
    """`model` (float) with each named linear's weight set to codes x scales, in place."""
    with torch.no_grad():
        for name, (c, s) in codes.items():
            weight = model.get_submodule(name).weight
            weight.copy_(dequantize(c, s).to(weight.dtype))
    return model


def check_untouched(model: nn.Module, others: dict[str, torch.Tensor]) -> float:
    """Largest |difference| between llm-compressor's unquantized tensors (norms, embedding) and the float model's."""
    state = model.state_dict()
    return max((others[k].float() - state[k].float()).abs().max().item() for k in others if k in state)


def torchao_codes(model: nn.Module, names: list[str]) -> Codes:
    """(codes, scales) held by the torchao int weights (IntxUnpackedToInt8Tensor: qdata, scale) of `names`."""
    codes: Codes = {}
    for name in names:
        w = model.get_submodule(name).weight
        rows = w.shape[0]
        codes[name] = (w.qdata.reshape(rows, -1).to(torch.int8), w.scale.reshape(rows, -1).float())
    return codes


def code_agreement(a: Codes, b: Codes) -> float:
    same = sum((a[n][0] == b[n][0]).sum().item() for n in a)
    return same / sum(a[n][0].numel() for n in a)


@torch.no_grad()
def output_errors(model: nn.Module, ids: torch.Tensor, variants: dict[str, Codes]) -> dict[str, float]:
    """Mean over linears of ||x W_q^T - x W^T|| / ||x W^T||, x = the float model's inputs to each linear."""
    names = list(next(iter(variants.values())))
    sums = {v: {n: [0.0, 0.0] for n in names} for v in variants}
    weights = {v: {n: dequantize(*c[n]) for n in names} for v, c in variants.items()}

    def hook(name: str):
        def accumulate(module, args, output):
            for v in variants:
                diff = args[0] @ weights[v][name].T - output
                sums[v][name][0] += diff.square().sum().item()
                sums[v][name][1] += output.square().sum().item()

        return accumulate

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {v: sum((e / t) ** 0.5 for e, t in s.values()) / len(s) for v, s in sums.items()}


def eval_texts(work: Path) -> dict[str, list[str]]:
    """The recipe's eval (8 Python-docs validation documents) and the GPL-3 as a second domain."""
    gpl = work / "GPL-3.txt"  # qatune reads local text files by suffix: .txt is one document
    shutil.copyfile(GPL, gpl)
    return {
        "python_docs": load_texts(DatasetConfig(name="python_docs", split="validation", max_documents=8)),
        "GPL-3": load_texts(DatasetConfig(path=str(gpl))),
    }


def evaluate(model: nn.Module, tokenizer, texts: dict[str, list[str]]) -> dict[str, float]:
    model.eval()
    return {
        domain: perplexity(model, tokenizer, t, seq_len=128, protocol="gptq", batch_size=8, progress=False)[
            "perplexity"
        ]
        for domain, t in texts.items()
    }


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def qatune_gptq(model_dir: str, q, ids: torch.Tensor, static_groups: bool) -> nn.Module:
    from qatune.gptq import GPTQConfig, gptq_quantize_

    cfg = GPTQConfig(samples=ids.shape[0], seq_len=ids.shape[1], static_groups=static_groups)
    return gptq_quantize_(load_model(model_dir, dtype="fp32"), q, ids, cfg)


def table(ppl: dict[str, dict[str, float]], walls: dict[str, str], domains: list[str]) -> list[str]:
    ref = ppl["llm-compressor GPTQ"]
    header = ["model", *(f"ppl {d}" for d in domains), *(f"vs llm-compressor {d}" for d in domains), "wall"]
    rows = [
        [name, *(f"{p[d]:.3f}" for d in domains), *(f"{p[d] / ref[d] - 1:+.2%}" for d in domains), walls[name]]
        for name, p in ppl.items()
    ]
    return markdown_table(header, rows)


def compare(model_dir: Path, tokenizer, q, ids: torch.Tensor, llmc: dict, llmc_codes: Codes, texts: dict):
    """Perplexities and wall times of float / RTN / llm-compressor GPTQ / qatune GPTQ, and each one's codes."""
    model_path, names = str(model_dir), list(llmc_codes)
    ppl = {"float": evaluate(load_model(model_path, dtype="fp32"), tokenizer, texts)}
    walls = {"float": "-"}
    rtn, rtn_s = timed(lambda: quantize_ptq_(load_model(model_path, dtype="fp32"), q))
    ppl["RTN"], walls["RTN"] = evaluate(rtn, tokenizer, texts), f"{rtn_s:.0f} s"
    codes = {"RTN": torchao_codes(rtn, names), "llm-compressor GPTQ": llmc_codes}
    del rtn
    llmc_model = with_weights(load_model(model_path, dtype="fp32"), llmc_codes)
    ppl["llm-compressor GPTQ"] = evaluate(llmc_model, tokenizer, texts)
    walls["llm-compressor GPTQ"] = f"{llmc['oneshot_s']:.0f} s (oneshot; {llmc.get('subprocess_s', '?')} s in all)"
    del llmc_model
    for name, static in (("qatune GPTQ static_groups", True), ("qatune GPTQ", False)):  # like for like; the default
        ours, ours_s = timed(qatune_gptq, model_path, q, ids, static)
        ppl[name], walls[name] = evaluate(ours, tokenizer, texts), f"{ours_s:.0f} s"
        codes[name] = torchao_codes(ours, names)
        del ours
    return ppl, walls, codes


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gptq_crosscheck_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model).expanduser().resolve() if args.model else download(DEFAULT_MODEL)
    tokenizer = load_tokenizer(str(model_dir))
    q = resolve_quantizer({"scheme": "4w", "group_size": args.group_size, "skip": ["lm_head"]})
    ids = calibration_ids(tokenizer, args.samples, args.seq_len)
    texts = eval_texts(work)

    out, llmc = run_llmcompressor(model_dir, ids, args.group_size, work)
    llmc_codes, others = read_llmcompressor(out)
    float_model = load_model(str(model_dir), dtype="fp32")
    print(f"llm-compressor's unquantized tensors vs float: max |diff| {check_untouched(float_model, others):.3g}")
    ppl, walls, codes = compare(model_dir, tokenizer, q, ids, llmc, llmc_codes, texts)

    domains = list(texts)
    print("\n".join(table(ppl, walls, domains)) + "\n")
    pairs = [("qatune GPTQ static_groups", "llm-compressor GPTQ"), ("qatune GPTQ", "llm-compressor GPTQ"),
             ("RTN", "llm-compressor GPTQ"), ("RTN", "qatune GPTQ")]  # fmt: skip
    for a, b in pairs:
        print(f"weight codes equal, {a} vs {b}: {code_agreement(codes[a], codes[b]):.2%}")
    held_out = build_dataset(DatasetConfig(name="python_docs", split="validation"), tokenizer, args.seq_len)
    errors = output_errors(float_model, held_out.input_ids[:4], codes)
    print(
        "mean relative linear output error, held-out float inputs:",
        ", ".join(f"{k} {v:.4f}" for k, v in errors.items()),
    )
    # Like for like: llm-compressor sets every group's scale from the original weights (static groups).
    gap = ppl["qatune GPTQ static_groups"][domains[0]] / ppl["llm-compressor GPTQ"][domains[0]] - 1
    summary = {"perplexity": ppl, "walls": walls, "output_error": errors, "in_domain_gap": gap, "llmcompressor": llmc}
    (work / "gptq_crosscheck.json").write_text(json.dumps(summary, indent=2) + "\n")
    verdict = "FAIL" if abs(gap) > args.tolerance else "OK"
    print(f"{verdict}: qatune GPTQ (static_groups, llm-compressor's algorithm) is {gap:+.2%} from llm-compressor's "
          f"in-domain (tolerance {args.tolerance:.0%}); qatune's default (scales from the updated weights): "
          f"{ppl['qatune GPTQ'][domains[0]] / ppl['llm-compressor GPTQ'][domains[0]] - 1:+.2%}")  # fmt: skip
    return 1 if verdict == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
