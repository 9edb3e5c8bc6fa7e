#!/usr/bin/env python3
"""Independent reference for `cargo xtask convert`: llama.cpp's own convert_hf_to_gguf.py (issue #16).

Steps (see README.md next to this file):
  1. Ember exports a GGUF model to a Hugging Face checkpoint (`--to hf --dtype f16`).
  2. That checkpoint goes back to GGUF with both Ember (`--type T`) and llama.cpp
     (`convert_hf_to_gguf.py --outtype T`), for T in --types (f16, q8_0). The two files must have the
     same tensor names, shapes, types and bit-identical data, and the same metadata up to the known,
     explained differences listed in EXPECTED below.
  3. Ember exports GPTQ checkpoints (--gptq variants); both tools dequantize them to an F32 GGUF.
     Per-tensor max |Ember - llama.cpp| must be 0.
  4. llama.cpp (refgen: greedy decoding + top-k logits; llama-cli if present) runs on Ember's GGUF and
     on llama.cpp's own, for the same prompt: identical tokens and logits.

With --as-phi3 the exported checkpoint is first re-expressed as a Phi-3 one (q/k/v_proj fused into
qkv_proj, gate/up_proj into gate_up_proj, model_type phi3: the same network, since HF llama and HF
Phi-3 rotate the same rows the same way), and step 3 quantizes Ember's Phi-3 GGUF of it, so the fused
layers are GPTQ-packed whole as upstream Phi-3 checkpoints are.

Exits non-zero on any mismatch. Needs gguf-py (taken from <llama-src>/gguf-py) and numpy in this
interpreter; convert_hf_to_gguf.py runs under --python (it needs torch, transformers, sentencepiece).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# general.* strings are provenance, not model content: llama.cpp derives them from the model card / the
# directory name (a dir called `hf` gives general.name "Hf"), Ember from the `gguf_metadata` block its
# own HF export records in config.json. They are reported, never a failure.
GENERAL_INFO_EXEMPT = {"general.architecture", "general.file_type", "general.quantization_version"}


class Fail(Exception):
    pass


def log(msg: str = "") -> None:
    print(msg, flush=True)


def run(cmd: list[str], logfile: Path, what: str, env: dict | None = None, ok_fail: str | None = None) -> str | None:
    """Runs cmd, output to logfile. Returns None on success; on failure raises Fail, unless the log
    contains ok_fail (then returns that marker: a documented unsupported case)."""
    e = dict(os.environ)
    e["RUST_BACKTRACE"] = "0"
    if env:
        e.update(env)
    t0 = time.time()
    with open(logfile, "wb") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=e, stdin=subprocess.DEVNULL)
    dt = time.time() - t0
    if p.returncode != 0:
        text = logfile.read_text(errors="replace")
        if ok_fail and ok_fail in text:
            return next(l for l in text.splitlines() if ok_fail in l).strip()
        tail = "\n".join(text.splitlines()[-15:])
        raise Fail(f"{what} failed (rc {p.returncode}, {dt:.1f}s): {' '.join(cmd)}\n--- {logfile} (tail) ---\n{tail}")
    log(f"    ok  {what} ({dt:.1f}s)")
    return None


# ---------------------------------------------------------------- GGUF comparison

def load(path: Path):
    from gguf import GGUFReader
    return GGUFReader(str(path))


def meta(r) -> dict:
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        out[k] = (tuple(int(t) for t in f.types), f.contents())
    return out


def short(v) -> str:
    s = repr(v)
    if len(s) <= 100:
        return s
    n = f" (len {len(v)})" if hasattr(v, "__len__") else ""
    return s[:90] + "..." + n


def compare_meta(a: dict, b: dict, la: str, lb: str, problems: list[str], notes: list[str]) -> None:
    arch = a.get("general.architecture", (None, None))[1]
    for k in sorted(set(a) | set(b)):
        info = k.startswith("general.") and k not in GENERAL_INFO_EXEMPT
        if k not in b or k not in a:
            side, other, (_, v) = (la, lb, a[k]) if k not in b else (lb, la, b[k])
            if info:
                notes.append(f"metadata key only in {side} (provenance, ignored): {k} = {short(v)}")
                continue
            if arch and k in (f"{arch}.attention.key_length", f"{arch}.attention.value_length"):
                # transformers' LlamaConfig fills head_dim = hidden_size / num_attention_heads, so llama.cpp
                # writes it; Ember writes it only when config.json has head_dim. Same meaning iff equal
                # to llama.cpp's default n_embd / n_head.
                src = a if k in a else b
                n_embd = src[f"{arch}.embedding_length"][1]
                n_head = src[f"{arch}.attention.head_count"][1]
                if v == n_embd // n_head:
                    notes.append(f"metadata key only in {side}: {k} = {v} (= n_embd/n_head, the default; equivalent)")
                    continue
            problems.append(f"metadata key only in {side}: {k} = {short(v)}")
            continue
        (ta, va), (tb, vb) = a[k], b[k]
        if ta == tb and va == vb:
            continue
        if info:
            notes.append(f"metadata {k} differs (provenance, ignored): {la}={short(va)} {lb}={short(vb)}")
            continue
        if ta != tb:
            problems.append(f"metadata {k}: value type {la}={ta} {lb}={tb}")
        if va != vb:
            if isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb):
                idx = [i for i, (x, y) in enumerate(zip(va, vb)) if x != y]
                problems.append(f"metadata {k}: {len(idx)} of {len(va)} elements differ, first at [{idx[0]}]: "
                                f"{la}={va[idx[0]]!r} {lb}={vb[idx[0]]!r}")
            else:
                problems.append(f"metadata {k}: {la}={short(va)} {lb}={short(vb)}")


def compare_gguf(pa: Path, pb: Path, la: str, lb: str, numeric: bool = False) -> tuple[list[str], list[str], dict]:
    """Returns (problems, notes, per-tensor max abs diff when numeric)."""
    a, b = load(pa), load(pb)
    problems: list[str] = []
    notes: list[str] = []
    compare_meta(meta(a), meta(b), la, lb, problems, notes)
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    for n in sorted(set(ta) - set(tb)):
        problems.append(f"tensor only in {la}: {n}")
    for n in sorted(set(tb) - set(ta)):
        problems.append(f"tensor only in {lb}: {n}")
    if [t.name for t in a.tensors] != [t.name for t in b.tensors] and set(ta) == set(tb):
        notes.append("tensor order differs (llama.cpp: HF names sorted as strings, blk.10 before blk.2; "
                     "Ember: numeric block order) - layout only")
    maxdiff: dict[str, float] = {}
    for t in a.tensors:
        if t.name not in tb:
            continue
        x, y = t, tb[t.name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            problems.append(f"tensor {t.name}: {la} {x.tensor_type.name}{[int(v) for v in x.shape]} vs "
                            f"{lb} {y.tensor_type.name}{[int(v) for v in y.shape]}")
            continue
        bx = np.asarray(x.data).view(np.uint8).reshape(-1)
        by = np.asarray(y.data).view(np.uint8).reshape(-1)
        if bx.shape == by.shape and np.array_equal(bx, by):
            maxdiff[t.name] = 0.0
            continue
        if bx.shape != by.shape:
            problems.append(f"tensor {t.name}: data size {bx.size} vs {by.size} bytes")
            continue
        first = int(np.flatnonzero(bx != by)[0])
        msg = f"tensor {t.name} ({x.tensor_type.name}): data differs, {int((bx != by).sum())} bytes, first at byte {first}"
        if x.tensor_type.name in ("F32", "F16"):
            fx = np.asarray(x.data, dtype=np.float64).reshape(-1)
            fy = np.asarray(y.data, dtype=np.float64).reshape(-1)
            d = np.abs(fx - fy)
            i = int(np.nanargmax(d))
            maxdiff[t.name] = float(d[i])
            msg += f"; max |diff| {d[i]:.3e} at element {i} ({la}={float(fx[i])!r} {lb}={float(fy[i])!r})"
        problems.append(msg)
    return problems, notes, maxdiff


# ---------------------------------------------------------------- llama.cpp runs

def refgen(bin_dir: Path, model: Path, prompt_file: Path, n: int, k: int, threads: int, out: Path, logf: Path) -> dict:
    run([str(bin_dir / "refgen"), "-m", str(model), "-f", str(prompt_file), "-n", str(n), "-k", str(k),
         "-t", str(threads), "-o", str(out)], logf, f"refgen {model.name}")
    return json.loads(out.read_text())


def compare_refgen(a: dict, b: dict, tol: float) -> tuple[list[str], str]:
    problems = []
    for key in ("prompt_tokens", "generated_tokens", "add_bos"):
        if a[key] != b[key]:
            problems.append(f"refgen {key}: ember={a[key]} llama.cpp={b[key]}")
    tops_a = [a["prompt_last_topk"]] + a["step_topk_after_each_generated_token"]
    tops_b = [b["prompt_last_topk"]] + b["step_topk_after_each_generated_token"]
    worst = 0.0
    for s, (x, y) in enumerate(zip(tops_a, tops_b)):
        ids_x, ids_y = [i for i, _ in x], [i for i, _ in y]
        if ids_x != ids_y:
            problems.append(f"refgen top-k ids at step {s}: ember={ids_x} llama.cpp={ids_y}")
            break
        worst = max(worst, max(abs(p - q) for (_, p), (_, q) in zip(x, y)))
    if worst > tol:
        problems.append(f"refgen top-k logits differ by up to {worst:g} (tolerance {tol:g})")
    text = bytes.fromhex(a["generated_text_hex"]).decode("utf-8", "replace")
    return problems, f"{len(tops_a)} top-{len(tops_a[0])} sets, max |dlogit| {worst:g}; text {text!r}"


def cli_generate(bin_dir: Path, model: Path, prompt: str, n: int, threads: int, logf: Path) -> str | None:
    exe = bin_dir / "llama-cli"
    if not exe.exists():
        return None
    # This llama-cli is conversation-only (no -no-cnv): -st runs one chat turn with the model's template.
    cmd = [str(exe), "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0", "-st", "--simple-io",
           "-t", str(threads), "--no-display-prompt", "--seed", "0"]
    e = dict(os.environ)
    p = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=300, env=e)
    logf.write_bytes(p.stdout + b"\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        raise Fail(f"llama-cli failed on {model} (rc {p.returncode}), see {logf}")
    out = p.stdout.decode("utf-8", "replace")
    marker = "> " + prompt
    i = out.rfind(marker)
    j = out.find("\n[ Prompt:", i + 1)
    if i < 0 or j < 0:
        return out  # unknown layout: compare the whole stdout minus timing lines
    return out[i + len(marker):j].strip()


# ---------------------------------------------------------------- main

def llama_dir_as_phi3(src: Path, dst: Path) -> None:
    """Rewrites an HF llama checkpoint (no biases, full rotary) as the equivalent Phi-3 checkpoint."""
    from safetensors.numpy import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise Fail("--as-phi3 needs a llama checkpoint without biases")
    t = load_file(str(src / "model.safetensors"))
    out = {}
    for name, v in t.items():
        if name.endswith((".k_proj.weight", ".v_proj.weight", ".up_proj.weight")):
            continue
        if name.endswith(".q_proj.weight"):
            p = name[: -len("q_proj.weight")]
            out[p + "qkv_proj.weight"] = np.concatenate([v, t[p + "k_proj.weight"], t[p + "v_proj.weight"]])
        elif name.endswith(".gate_proj.weight"):
            p = name[: -len("gate_proj.weight")]
            out[p + "gate_up_proj.weight"] = np.concatenate([v, t[p + "up_proj.weight"]])
        else:
            out[name] = v
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    phi = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                               "rms_norm_eps", "rope_theta", "tie_word_embeddings", "torch_dtype",
                               "bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    phi.update({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu",
                "original_max_position_embeddings": cfg["max_position_embeddings"], "rope_scaling": None,
                "sliding_window": None, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0,
                "initializer_range": 0.02, "use_cache": True})
    if "gguf_metadata" in cfg:
        phi["gguf_metadata"] = cfg["gguf_metadata"]
    (dst / "config.json").write_text(json.dumps(phi, indent=2))
    for f in ("tokenizer.json", "generation_config.json", "tokenizer.model"):
        if (src / f).exists():
            shutil.copy(src / f, dst / f)
    tc = json.loads((src / "tokenizer_config.json").read_text())
    if not (src / "tokenizer.model").exists():
        # Phi-4 mini's marker for a byte-level BPE vocabulary (llama.cpp's Phi3MiniModel.set_vocab).
        tc["tokenizer_class"] = "GPT2Tokenizer"
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xtask", required=True, type=Path, help="built xtask binary (target/release/xtask)")
    ap.add_argument("--model", required=True, type=Path, help="source GGUF model")
    ap.add_argument("--llama-src", required=True, type=Path, help="llama.cpp source dir (convert_hf_to_gguf.py, gguf-py)")
    ap.add_argument("--llama-bin", type=Path, help="llama.cpp bin dir (refgen, llama-cli); omit to skip step 4")
    ap.add_argument("--python", default=sys.executable, help="interpreter with torch for convert_hf_to_gguf.py")
    ap.add_argument("--work", type=Path, help="work dir (default: a temp dir, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep every intermediate file")
    ap.add_argument("--types", default="f16,q8_0", help="GGUF types for step 2 (default f16,q8_0)")
    ap.add_argument("--gptq", default="4:64,4:64:act,4:64:asym,8:64,2:64,4:-1",
                    help="GPTQ variants bits:group[:act][:asym], comma-separated; '' skips step 3")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--n-predict", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--logit-tol", type=float, default=0.0, help="max |dlogit| allowed in step 4 (default 0)")
    ap.add_argument("--as-phi3", action="store_true", help="re-express the checkpoint as Phi-3 (fused layers)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every tensor's max |diff| in step 3")
    a = ap.parse_args()

    sys.path.insert(0, str(a.llama_src / "gguf-py"))
    import gguf  # noqa: F401  (fail early)

    conv = a.llama_src / "convert_hf_to_gguf.py"
    for p in (a.xtask, a.model, conv):
        if not p.exists():
            log(f"FAIL: missing {p}")
            return 2
    work = a.work or Path(tempfile.mkdtemp(prefix="ember-llamacpp-ref-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    xt = str(a.xtask)
    # convert_hf_to_gguf.py prefers <llama-src>/gguf-py; the torch interpreter needs nothing else from us.
    py_env = {"PYTHONPATH": str(a.llama_src / "gguf-py"), "TQDM_DISABLE": "1"}
    failures: list[str] = []
    summary: list[str] = []

    def drop(*paths: Path) -> None:
        if a.keep:
            return
        for p in paths:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()

    def report(tag: str, problems: list[str], notes: list[str]) -> None:
        for n in notes:
            log(f"    note  {n}")
        for p in problems:
            log(f"    MISMATCH  {p}")
        failures.extend(f"{tag}: {p}" for p in problems)

    log(f"work dir: {work}")
    log(f"model:    {a.model}")
    try:
        # ---- step 2
        hf = work / "hf"
        log("\n[1] Ember GGUF -> HF (f16)")
        run([xt, "convert", str(a.model), str(hf), "--to", "hf", "--dtype", "f16"], logs / "export-hf.log", "xtask convert --to hf")
        gptq_source = a.model
        if a.as_phi3:
            llama_hf = work / "hf-llama"
            hf.rename(llama_hf)
            llama_dir_as_phi3(llama_hf, hf)
            drop(llama_hf)
            log("    re-expressed as Phi-3 (qkv_proj, gate_up_proj)")
            gptq_source = work / "phi3-f32.gguf"
            run([xt, "convert", str(hf), str(gptq_source), "--type", "f32"], logs / "phi3-f32.log", "xtask convert --type f32")
        for ty in [t for t in a.types.split(",") if t]:
            log(f"\n[2] HF -> GGUF {ty}: Ember vs llama.cpp convert_hf_to_gguf.py")
            pe, pl = work / f"ember-{ty}.gguf", work / f"llama-{ty}.gguf"
            run([xt, "convert", str(hf), str(pe), "--type", ty], logs / f"ember-{ty}.log", f"xtask convert --type {ty}")
            run([a.python, str(conv), str(hf), "--outtype", ty, "--outfile", str(pl)], logs / f"llama-{ty}.log",
                f"convert_hf_to_gguf.py --outtype {ty}", env=py_env)
            problems, notes, md = compare_gguf(pe, pl, "ember", "llama.cpp")
            report(f"HF->GGUF {ty}", problems, notes)
            n_t = len(md)
            res = f"{n_t} tensors bit-identical" if not problems else f"{len(problems)} mismatches"
            summary.append(f"{'HF->GGUF ' + ty:16s}: {res}")
            log(f"    => {res}")

            if a.llama_bin:
                log(f"\n[4] llama.cpp on ember-{ty}.gguf vs llama-{ty}.gguf (greedy, {a.n_predict} tokens)")
                pf = work / "prompt.txt"
                pf.write_text(a.prompt)
                if (a.llama_bin / "refgen").exists():
                    ra = refgen(a.llama_bin, pe, pf, a.n_predict, a.top_k, a.threads, work / f"refgen-ember-{ty}.json", logs / f"refgen-ember-{ty}.log")
                    rb = refgen(a.llama_bin, pl, pf, a.n_predict, a.top_k, a.threads, work / f"refgen-llama-{ty}.json", logs / f"refgen-llama-{ty}.log")
                    pr, info = compare_refgen(ra, rb, a.logit_tol)
                    report(f"refgen {ty}", pr, [])
                    res = ("identical: " if not pr else "DIFFERENT: ") + info
                    log(f"    => refgen {res}")
                    summary.append(f"{'refgen ' + ty:16s}: {res}")
                else:
                    log("    note  no refgen in --llama-bin; logits not compared")
                ca = cli_generate(a.llama_bin, pe, a.prompt, a.n_predict, a.threads, logs / f"cli-ember-{ty}.log")
                if ca is not None:
                    cb = cli_generate(a.llama_bin, pl, a.prompt, a.n_predict, a.threads, logs / f"cli-llama-{ty}.log")
                    if ca != cb:
                        report(f"llama-cli {ty}", [f"llama-cli output: ember={ca!r} llama.cpp={cb!r}"], [])
                        summary.append(f"{'llama-cli ' + ty:16s}: DIFFERENT")
                    else:
                        log(f"    => llama-cli (chat, --temp 0) identical: {ca!r}")
                        summary.append(f"{'llama-cli ' + ty:16s}: identical: {ca!r}")
            drop(pe, pl)
        drop(hf)

        # ---- step 3 (from the Phi-3 GGUF with --as-phi3)
        for spec in [s for s in a.gptq.split(",") if s]:
            parts = spec.split(":")
            bits, group = parts[0], parts[1]
            flags = parts[2:]
            name = f"gptq-b{bits}-g{'row' if group == '-1' else group}" + "".join(f"-{f}" for f in flags)
            log(f"\n[3] GPTQ {spec}: Ember vs llama.cpp dequantization to F32")
            d = work / name
            cmd = [xt, "convert", str(gptq_source), str(d), "--to", "gptq", "--bits", bits, "--group-size", group]
            cmd += ["--act-order"] if "act" in flags else []
            cmd += ["--asym"] if "asym" in flags else []
            run(cmd, logs / f"{name}-export.log", "xtask convert --to gptq " + " ".join(cmd[6:]))
            qc = json.loads((d / "config.json").read_text()).get("quantization_config", {})
            log(f"    quantization_config: bits={qc.get('bits')} group_size={qc.get('group_size')} "
                f"desc_act={qc.get('desc_act')} sym={qc.get('sym')} checkpoint_format={qc.get('checkpoint_format')}")
            pe, pl = work / f"ember-{name}-f32.gguf", work / f"llama-{name}-f32.gguf"
            run([xt, "convert", str(d), str(pe), "--type", "f32"], logs / f"{name}-ember.log", "xtask convert --type f32")
            skip = run([a.python, str(conv), str(d), "--outtype", "f32", "--outfile", str(pl)], logs / f"{name}-llama.log",
                       "convert_hf_to_gguf.py --outtype f32", env=py_env,
                       ok_fail="bit gptq dequantization is not yet implemented")
            if skip:
                log(f"    SKIP  llama.cpp does not support this: {skip}")
                summary.append(f"{'GPTQ ' + spec:16s}: skipped (llama.cpp: {skip})")
                drop(pe, d)
                continue
            problems, notes, md = compare_gguf(pe, pl, "ember", "llama.cpp")
            report(f"GPTQ {spec}", problems, notes)
            if a.verbose:
                for n, v in md.items():
                    log(f"      {n:32s} max|diff| {v:g}")
            worst = max(md.items(), key=lambda kv: kv[1]) if md else ("-", 0.0)
            res = (f"{len(md)} tensors, max |diff| {worst[1]:g}" + (f" ({worst[0]})" if worst[1] else " (all bit-identical)")
                   if not problems else f"{len(problems)} mismatches")
            log(f"    => {res}")
            summary.append(f"{'GPTQ ' + spec:16s}: {res}")
            drop(pe, pl, d)
    except Fail as e:
        failures.append(str(e))
        log(f"\nFAIL: {e}")

    log("\n==== summary ====")
    for s in summary:
        log("  " + s)
    if not a.keep and not a.work and not failures:
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        log(f"work dir kept for inspection: {work}")
        log(f"\nFAILED: {len(failures)} problem(s); first: {failures[0].splitlines()[0]}")
        return 1
    log("\nOK: Ember's converter agrees with llama.cpp's convert_hf_to_gguf.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
