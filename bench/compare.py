"""SafeSteer vs repeng, steering-vectors and llama.cpp control vectors, in one run (`make bench-peers`).

Same model (the embedded SmolLM2-135M-Instruct: our dequantized checkpoint for the
transformers-based peers, the original GGUF for llama.cpp), same prompts (64 Do-Not-Answer
harmful, 64 of our benign), same layer and strength, greedy decoding, 2 threads. Peers run in
bench/.venv-peers (they need transformers 4 and numpy 1). Every figure is a median over repeats
with min-max, and speed is also given as a ratio to ours measured in the same run.
Writes docs/benchmarks.md and docs/benchmarks.json (also bench/results/compare.json).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from timing import summary, timed

from safesteer import SteeringSpec, datasets, extract_vectors, generate, load_model
from safesteer.checkpoints import embedded_gguf_path, prepare_gguf
from safesteer.llama_cpp import export_llama_cpp
from safesteer.policy import PolicyCategory, PolicyVersion
from safesteer.vectors import ExtractionSettings

PROMPT_VECTORS = ExtractionSettings(method="mean-diff")  # what these figures have always timed: prompt vectors

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
THREADS, N_PROMPTS, NEW_TOKENS, STRENGTH, REPEATS, GENERATION_REPEATS = 2, 64, 64, 4.0, 3, 7
MEMORY_PRECISIONS = ("fp32", "nf4", "int4")


def memory_mb(precision: str) -> dict[str, float]:
    """Memory of a fresh process that loads the model and generates a few tokens.

    `weights`: the model's parameters and buffers; `resident`: the process after loading
    (Python, torch and the model); `peak`: the high-water mark, which includes loading (4-bit
    quantizes from the float checkpoint, so its peak is the float model's). Both come from
    /proc/self/status: `ru_maxrss` would also count the parent's size at fork time.
    """
    code = (
        "import gc, json; from safesteer import load_model, generate; "
        f"lm = load_model(None, '{precision}'); generate(lm, ['Hello'], max_new_tokens=8); gc.collect(); "
        "status = dict(line.split(':', 1) for line in open('/proc/self/status')); "
        "kb = lambda key: int(status[key].split()[0]); "
        "print(json.dumps({'weights': lm.model.get_memory_footprint() / 2**20, "
        "'resident': kb('VmRSS') / 1024, 'peak': kb('VmHWM') / 1024}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peer_model_folder(checkpoint: Path) -> Path:
    """Our checkpoint with a config transformers 4 reads the same way (rope_theta spelled out)."""
    folder = RESULTS / "peer-model"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    config.setdefault("torch_dtype", "float32")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    if "model.embed_tokens.weight" not in tensors:  # tied: transformers 4 ties from the embeddings side
        tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
    save_file(tensors, str(weights), metadata={"format": "pt"})  # transformers 4 insists on the format key
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 writes "TokenizersBackend"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder


def measure_ours(
    precision: str, harmful: list[str], safe: list[str], layer: int = 15, decoder: str = "auto"
) -> tuple[dict, dict]:
    """Extraction and generation timings; `decoder="transformers"` times generation as it was before the lean loop."""
    lm = load_model(None, precision)  # type: ignore[arg-type]
    figures: dict = {}
    label = precision if decoder == "auto" else f"{precision}_{decoder}"
    extract_vectors(lm, harmful[:8], safe[:8], PROMPT_VECTORS)  # warm-up
    if decoder == "auto":
        figures[f"extraction_s_{label}"], vectors = timed(
            lambda: extract_vectors(lm, harmful, safe, PROMPT_VECTORS), REPEATS
        )
    else:
        vectors = extract_vectors(lm, harmful, safe, PROMPT_VECTORS)
    spec = SteeringSpec(vectors.vector(layer), layer, STRENGTH)
    both = SteeringSpec(spec.vector, layer, (0.0, STRENGTH))
    preview = harmful[0]

    def answer(prompts: list[str], specs: list[SteeringSpec]) -> list[str]:
        return generate(lm, prompts, specs, max_new_tokens=NEW_TOKENS, fixed_length=True, decoder=decoder)

    generate(lm, [preview], max_new_tokens=8, decoder=decoder)
    runs = {
        "plain": lambda: answer([preview], []),
        "steered": lambda: answer([preview], [spec]),
        "side_by_side": lambda: answer([preview, preview], [both]),
    }
    samples: dict[str, list[float]] = {name: [] for name in runs}
    texts: dict[str, list[str]] = {}
    for _ in range(GENERATION_REPEATS):  # interleaved, so drift on a shared machine hits all three alike
        for name, run in runs.items():
            start = time.perf_counter()
            texts[name] = run()
            samples[name].append(time.perf_counter() - start)
    for name, values in samples.items():
        figures[f"{name}_s_{label}"] = summary(values)
    for name in ("steered", "side_by_side"):  # ratios of runs taken back to back: drift cancels
        paired = [a / b for a, b in zip(samples[name], samples["plain"], strict=True)]
        figures[f"{name}_vs_plain_{label}"] = summary(paired)
    plain, steered = texts["plain"], texts["steered"]
    return figures, {"lm": lm, "vectors": vectors, "layer": layer, "plain": plain[0], "steered": steered[0]}


def main() -> None:
    torch.set_num_threads(THREADS)
    RESULTS.mkdir(exist_ok=True)
    harmful = datasets.harmful_prompts("malicious-uses", limit=N_PROMPTS)
    safe = datasets.benign_prompts(limit=N_PROMPTS)
    results: dict = {
        "setup": {"threads": THREADS, "prompts": 2 * N_PROMPTS, "new_tokens": NEW_TOKENS, "strength": STRENGTH}
    }

    ours: dict = {}
    for precision, decoder in (("fp32", "auto"), ("nf4", "auto"), ("int4", "auto"), ("nf4", "transformers")):
        figures, details = measure_ours(precision, harmful, safe, decoder=decoder)
        ours.update(figures)
        if precision == "fp32":
            fp32 = details
    results["ours"] = ours
    results["memory_mb"] = {p: memory_mb(p) for p in MEMORY_PRECISIONS}

    lm, vectors, layer = fp32["lm"], fp32["vectors"], fp32["layer"]
    category = PolicyCategory("malicious-uses", harmful, safe, vectors, layer, STRENGTH)
    control_vector = export_llama_cpp(PolicyVersion("bench", [category]), RESULTS / "control-vector.gguf")
    checkpoint = prepare_gguf(embedded_gguf_path())
    inputs = {
        "folder": str(peer_model_folder(checkpoint)),
        "gguf": str(embedded_gguf_path()),
        "control_vector": str(control_vector),
        "threads": THREADS,
        "repeats": REPEATS,
        "layer": layer,
        "strength": STRENGTH,
        "new_tokens": NEW_TOKENS,
        "n_layers": lm.identity.n_layers,
        "hidden_size": lm.identity.hidden_size,
        "harmful_chat": [lm.chat_text(p) for p in harmful],
        "safe_chat": [lm.chat_text(p) for p in safe],
        "preview_chat": lm.chat_text(harmful[0]),
        "our_vector": vectors.vector(layer).tolist(),
    }
    (RESULTS / "peer-inputs.json").write_text(json.dumps(inputs))
    if not PEERS_PYTHON.exists():
        raise SystemExit("run `make bench-peers` first: it builds bench/.venv-peers")
    subprocess.run(
        [str(PEERS_PYTHON), str(ROOT / "peers.py"), str(RESULTS / "peer-inputs.json"), str(RESULTS / "peers.json")],
        check=True,
    )
    peers = json.loads((RESULTS / "peers.json").read_text())
    results["peers"] = peers
    results["agreement"] = {
        "mean_diff_cosine_vs_steering_vectors": peers["steering_vectors"]["cosine_with_ours"],
        "steered_text_identical_to_steering_vectors": peers["steering_vectors"]["steered_text"].strip()
        == fp32["steered"],
        "plain_text_identical_to_transformers": peers["steering_vectors"]["plain_text"].strip() == fp32["plain"],
        "llama_cpp_steered_common_prefix_chars": _common_prefix(
            peers["llama_cpp"]["steered_text"].strip(), fp32["steered"]
        ),
        "llama_cpp_plain_common_prefix_chars": _common_prefix(peers["llama_cpp"]["plain_text"].strip(), fp32["plain"]),
        "texts": {"ours_plain": fp32["plain"], "ours_steered": fp32["steered"]},
    }
    (RESULTS / "compare.json").write_text(json.dumps(results, indent=2))
    (ROOT.parent / "docs").mkdir(exist_ok=True)
    write_markdown(results)
    print((ROOT.parent / "docs" / "benchmarks.md").read_text())


def _common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _fmt(t: dict) -> str:
    return f"{t['median']:.2f} s ({t['min']:.2f}–{t['max']:.2f})"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}"


def _paired(ratios: dict) -> str:
    """Median of back-to-back steered/plain ratios, with their spread."""
    return (
        f"{100 * (ratios['median'] - 1):+.1f}% ({100 * (ratios['min'] - 1):+.0f}% to {100 * (ratios['max'] - 1):+.0f}%)"
    )


def _overhead(steered: dict, plain: dict) -> str:
    return f"{100 * (steered['median'] / plain['median'] - 1):+.1f}%"


def write_markdown(r: dict) -> None:
    ours, peers, n = r["ours"], r["peers"], r["setup"]["new_tokens"]
    sv, rp, cpp = peers["steering_vectors"], peers["repeng"], peers["llama_cpp"]

    def tps(t: dict) -> float:
        return n / t["median"]

    base_x = ours["extraction_s_fp32"]["median"]
    base_g = tps(ours["steered_s_int4"])
    cpp_plain = cpp["tokens"][0] / cpp["plain_generation_s"]["median"]
    cpp_steered = cpp["tokens"][1] / cpp["steered_generation_s"]["median"]
    extraction = "vector extraction, 128 prompts, all layers (ratio to SafeSteer fp32)"
    generation = f"steered generation, {n} tokens (ratio to SafeSteer int4)"

    def generation_row(label: str, seconds: dict) -> tuple[str, str, str]:
        return label, f"{tps(seconds):.1f} tok/s", _ratio(tps(seconds), base_g)

    rows = [
        (extraction, "SafeSteer fp32", _fmt(ours["extraction_s_fp32"]), "1.00"),
        ("", "SafeSteer 4-bit NF4", _fmt(ours["extraction_s_nf4"]), _ratio(ours["extraction_s_nf4"]["median"], base_x)),
        (
            "",
            "SafeSteer 4-bit int4",
            _fmt(ours["extraction_s_int4"]),
            _ratio(ours["extraction_s_int4"]["median"], base_x),
        ),
        ("", "steering-vectors (fp32)", _fmt(sv["extraction_s"]), _ratio(sv["extraction_s"]["median"], base_x)),
        ("", "repeng pca_diff (fp32)", _fmt(rp["extraction_s"]), _ratio(rp["extraction_s"]["median"], base_x)),
        (generation, *generation_row("SafeSteer 4-bit int4, lean loop (CPU preview default)", ours["steered_s_int4"])),
        ("", *generation_row("SafeSteer 4-bit NF4, lean loop", ours["steered_s_nf4"])),
        (
            "",
            *generation_row("SafeSteer 4-bit NF4, transformers generate (before)", ours["steered_s_nf4_transformers"]),
        ),
        ("", *generation_row("SafeSteer fp32, lean loop", ours["steered_s_fp32"])),
        ("", *generation_row("steering-vectors (fp32)", sv["steered_generation_s"])),
        ("", *generation_row("repeng (fp32)", rp["steered_generation_s"])),
        ("", "llama.cpp + our control vector (Q4_1)", f"{cpp_steered:.1f} tok/s", _ratio(cpp_steered, base_g)),
        *[
            (
                "steering overhead per token" if i == 0 else "",
                f"SafeSteer {p}",
                _paired(ours[f"steered_vs_plain_{p}"]),
                "",
            )
            for i, p in enumerate(("int4", "nf4", "fp32"))
        ],
        ("", "steering-vectors", _overhead(sv["steered_generation_s"], sv["plain_generation_s"]), ""),
        ("", "llama.cpp", _overhead(cpp["steered_generation_s"], cpp["plain_generation_s"]), ""),
        *[
            (
                "side-by-side preview (naive + steered) vs one unsteered" if i == 0 else "",
                f"SafeSteer {p}, one batch",
                _fmt(ours[f"side_by_side_s_{p}"]),
                f"{ours[f'side_by_side_vs_plain_{p}']['median']:.2f}x",
            )
            for i, p in enumerate(("int4", "nf4"))
        ],
        *[
            (f"memory: {kind}" if i == 0 else "", f"SafeSteer {p}", f"{r['memory_mb'][p][kind]:.0f} MB", "")
            for kind in ("weights", "resident", "peak")
            for i, p in enumerate(MEMORY_PRECISIONS)
        ],
    ]
    cpp_preview = n / cpp_plain + n / cpp_steered  # llama.cpp: naive, then steered (a control vector is global)
    preview_rows = [
        (label, tps(ours[f"steered_s_{key}"]), ours[f"side_by_side_s_{key}"]["median"])
        for label, key in (
            ("before: NF4, transformers generate", "nf4_transformers"),
            ("NF4, lean loop", "nf4"),
            ("after: int4, lean loop (CPU default)", "int4"),
        )
    ]
    preview_table = [
        "| SafeSteer path | steered tok/s | llama.cpp is faster by | side-by-side preview | llama.cpp is faster by |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {label} | {speed:.1f} | {cpp_steered / speed:.2f}x | {latency:.2f} s | {latency / cpp_preview:.2f}x |"
            for label, speed, latency in preview_rows
        ],
        f"| llama.cpp, Q4_1 + our control vector | {cpp_steered:.1f} | | {cpp_preview:.2f} s (naive, then steered) | |",
    ]
    r["preview_vs_llama_cpp"] = {
        label: {"tokens_per_s_gap": cpp_steered / speed, "side_by_side_gap": latency / cpp_preview}
        for label, speed, latency in preview_rows
    }
    a = r["agreement"]
    layer = json.loads((RESULTS / "peer-inputs.json").read_text())["layer"]
    text = [
        "# Benchmarks",
        "",
        "Produced by `make bench-peers` (`bench/compare.py`) on a 2-core CPU; medians of "
        f"{REPEATS} runs with min–max, ratios to SafeSteer measured in the same run (for seconds lower is "
        "faster, for tokens/s higher is faster).",
        "",
        "| measure | tool | value | ratio to SafeSteer |",
        "| --- | --- | --- | --- |",
        *[f"| {m} | {t} | {v} | {x} |" for m, t, v, x in rows],
        "",
        "## Preview speed against llama.cpp, before and after",
        "",
        "The target is a preview within 2x of llama.cpp. A side-by-side preview is one batched call for SafeSteer; "
        "llama.cpp applies a control vector to its whole context, so it answers naive and steered one after the "
        f"other (its time is {n} tokens at its plain rate plus {n} at its steered rate).",
        "",
        *preview_table,
        "",
        "## Do the tools agree?",
        "",
        "- Mean-difference vector vs steering-vectors' mean aggregator, same layer and site: "
        f"cosine {a['mean_diff_cosine_vs_steering_vectors']:.4f}.",
        "- Greedy steered text, our vector applied by steering-vectors vs by SafeSteer: "
        f"identical = {a['steered_text_identical_to_steering_vectors']}.",
        f"- llama.cpp applied our exported control vector: {cpp['control_vector_applied']}; "
        f"its steered text differs from its plain text: {cpp['plain_text'] != cpp['steered_text']}. "
        f"It agrees with SafeSteer's fp32 steered text for the first {a['llama_cpp_steered_common_prefix_chars']} "
        f"characters (plain texts: {a['llama_cpp_plain_common_prefix_chars']}); llama.cpp runs the Q4_1 weights with "
        "its own kernels, so greedy texts drift apart after a while even without steering.",
        "- repeng uses PCA of paired differences, not a mean difference, so its direction is only compared "
        f"loosely (|cosine| {rp['abs_cosine_with_ours']:.3f}).",
        "",
        "## Method",
        "",
        "Same model for all: SmolLM2-135M-Instruct (our dequantized float32 checkpoint for the transformers-based "
        "tools, the original Q4_1 GGUF for llama.cpp). Same 64 Do-Not-Answer + 64 benign prompts, chat template "
        f"applied, layer {layer}, strength {STRENGTH}, greedy decoding, {THREADS} threads, {n} new tokens "
        "(end-of-text ignored). Memory is measured in a fresh process that loads the model and generates 8 tokens: "
        "weights (parameters and buffers), resident after loading, and the peak including loading. "
        "SafeSteer's steering overhead and side-by-side ratio are medians of ratios between runs taken back to back "
        "(the peers': ratios of medians); a few percent either way is within this shared machine's noise.",
    ]
    (ROOT.parent / "docs").mkdir(exist_ok=True)
    (ROOT.parent / "docs" / "benchmarks.md").write_text("\n".join(text) + "\n")
    (ROOT.parent / "docs" / "benchmarks.json").write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
