"""The QAT-phase sweep behind smollm2_135m's default schedule (issue 27), with qatune's functions directly.

    python benchmarks/qat_schedule_sweep.py float steps=180                   # the float fine-tune, saved
    python benchmarks/qat_schedule_sweep.py ptq steps=180                     # its RTN and GPTQ (32 x 512 calibration)
    python benchmarks/qat_schedule_sweep.py qad steps=36 lr=1e-4 w=1 [init=gptq] [warmup=3] [T=1]   # a QAT phase

Same data, batch and eval as the recipe's smollm2_135m config (8da4w g32, lm_head float; `scheme=4w` for 4w); a QAT
phase starts from the saved float model and is distilled from it (w: the KL weight; w=0: CE only). Second domain:
the GPL-3 text. One result line per stage, appended to $SWEEP_DIR/results.jsonl (default /tmp/qat_sweep).
THREADS: torch threads (default 1).
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from qatune.data import DatasetConfig, build_dataset, load_texts
from qatune.distillation import DistillationConfig, freeze_teacher, teacher_distillation_loss
from qatune.evaluation import perplexity
from qatune.gptq import calibration_ids, gptq_, gptq_quantize_
from qatune.models import load_model, load_tokenizer
from qatune.quantization import convert_to_int4, fake_quantize_, quantize_ptq_, resolve_quantizer
from qatune.training import TrainConfig, make_accelerator, train

PATH = "HuggingFaceTB/SmolLM2-135M-Instruct"
D = Path(os.environ.get("SWEEP_DIR", "/tmp/qat_sweep"))


def evaluate(model, tok, domains) -> dict:
    return {
        k: round(perplexity(model, tok, t, seq_len=128, protocol="gptq", batch_size=8)["perplexity"], 3)
        for k, t in domains.items()
    }


def log(name: str, scheme: str, result: dict) -> None:
    result = {"name": name, "scheme": scheme, **result}
    print("RESULT", json.dumps(result), flush=True)
    with open(D / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


def run_train(model, data, steps: int, lr: float, warmup: int, loss_fn=None, name: str = "x"):
    cfg = TrainConfig(batch_size=4, max_steps=steps, clip_grad_norm=1.0)
    opt = {"_component_": "torch.optim.AdamW", "lr": lr, "weight_decay": 0.0}
    sch = {"_component_": "transformers.get_cosine_schedule_with_warmup", "num_warmup_steps": warmup}
    acc = make_accelerator(torch.device("cpu"), 1, str(D / "run"), [])
    start = time.time()
    model, _ = train(model, data, cfg=cfg, optimizer_cfg=opt, scheduler_cfg=sch, accelerator=acc,
                     output_dir=D / "run" / name, seed=0, loss_fn=loss_fn, run_name=name)  # fmt: skip
    return model, time.time() - start


def float_model(steps: int):
    model = load_model(PATH, dtype="float32", device="cpu")
    model.load_state_dict(torch.load(D / f"float{steps}.pt"))
    return model


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    D.mkdir(parents=True, exist_ok=True)
    shutil.copyfile("/usr/share/common-licenses/GPL-3", D / "gpl3.txt")
    stage, args = sys.argv[1], dict(a.split("=") for a in sys.argv[2:])
    scheme = args.get("scheme", "8da4w")
    q = resolve_quantizer({"scheme": scheme, "group_size": 32, "skip": ["lm_head"]})
    tok = load_tokenizer(PATH)
    data = build_dataset(DatasetConfig(name="python_docs", split="train"), tok, 128)
    domains = {"docs": load_texts(DatasetConfig(name="python_docs", split="validation", max_documents=8)),
               "gpl": load_texts(DatasetConfig(path=str(D / "gpl3.txt")))}  # fmt: skip
    ids = calibration_ids(build_dataset(DatasetConfig(name="python_docs", split="train"), tok, 512), 32)
    if stage == "float":
        steps = int(args.get("steps", 180))
        model, wall = run_train(load_model(PATH, dtype="float32", device="cpu"), data, steps, 3e-4, 3, name="float")
        torch.save(model.state_dict(), D / f"float{steps}.pt")
        log(f"float{steps}", scheme, {**evaluate(model.eval(), tok, domains), "wall_s": round(wall)})
    elif stage == "ptq":
        steps = int(args.get("steps", 180))
        log(f"rtn_float{steps}", scheme, evaluate(quantize_ptq_(float_model(steps), q), tok, domains))
        start = time.time()
        model = gptq_quantize_(float_model(steps), q, ids)
        log(f"gptq_float{steps}", scheme, {**evaluate(model, tok, domains), "wall_s": round(time.time() - start)})
    elif stage == "qad":  # a QAT phase from float{base}: steps, lr, KL weight w, init rtn | gptq
        base, steps, lr, w = int(args.get("base", 180)), int(args["steps"]), float(args["lr"]), float(args.get("w", 1))
        warmup, init, temperature = int(args.get("warmup", 0)), args.get("init", "rtn"), float(args.get("T", 1.0))
        model = float_model(base)
        teacher = freeze_teacher(float_model(base)) if w > 0 else None
        if init == "gptq":
            gptq_(model, q, ids)
        fake_quantize_(model, q)
        cfg = DistillationConfig(weight=w, temperature=temperature)
        loss_fn = (lambda m, batch: teacher_distillation_loss(m, teacher, batch, cfg)) if w > 0 else None
        model, wall = run_train(model, data, steps, lr, warmup, loss_fn=loss_fn, name="qad")
        convert_to_int4(model, q)
        name = f"qad base={base} K={steps} lr={lr} w={w} warm={warmup} init={init} T={temperature}"
        log(name, scheme, {**evaluate(model.eval(), tok, domains), "wall_s": round(wall)})


if __name__ == "__main__":
    main()
