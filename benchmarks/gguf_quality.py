"""edgelm's GGUF quantizer against llama.cpp's own, on one checkpoint, in one run.

    python benchmarks/gguf_quality.py runs/tiny [--types q8_0,q4_0,q4_k_m] [--calibration FILE] [--windows 16]

For each type, the checkpoint is exported twice: by edgelm (`export_gguf`) and by llama.cpp's quantizer from
edgelm's F32 file (`--via llama.cpp`). Both files run in the same llama.cpp runtime, so the speed ratio
isolates nothing but the file (expected 1.0 ± noise); the accuracy is the mean KL divergence of each file's
next-token distribution from the float32 PyTorch reference, measured as `edgelm check` measures it (held-out
text of the built-in corpus, the second half of each window scored, llama.cpp with an F32 KV cache).
Speed is llama-bench style (`edgelm.evaluation.check.speed_round`): pp (prefill of one context) and tg128
(decode) tokens/s, mean ± std of 5 runs, with llama.cpp's default F16 KV cache.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import edgelm
from edgelm.evaluation.check import bench_tokens, evaluate, speed_round
from edgelm.evaluation.reference import compute_reference
from edgelm.export.gguf import export_gguf, export_gguf_via_llama_cpp


def speeds(paths: list[Path], prompt: list[int], decode: list[int], runs: int = 5) -> list[tuple[list, list]]:
    """Prefill and decode tokens/s of each file over `runs` rounds (after a warm-up round); the files take
    turns within each round, so that a drift in the machine's speed affects them alike."""
    models = [edgelm.load(path) for path in paths]
    results: list[tuple[list, list]] = [([], []) for _ in paths]
    for round_ in range(runs + 1):
        for model, (pp, tg) in zip(models, results, strict=True):
            prefill, generate, _ = speed_round(model.runtime, prompt, decode)
            if round_:
                pp.append(prefill)
                tg.append(generate)
    for model in models:
        model.close()
    return results


def fmt(values: list[float]) -> str:
    return f"{statistics.mean(values):9,.0f} ± {statistics.stdev(values):6,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", type=Path, help="an edgelm training run (it holds the validation tokens)"
    )
    parser.add_argument("--types", default="q8_0,q4_0,q4_k_m")
    parser.add_argument("--calibration", type=Path, help="also export edgelm files calibrated on this text")
    parser.add_argument("--windows", type=int, default=16, help="held-out windows for the KL divergence")
    args = parser.parse_args()

    reference = compute_reference(args.checkpoint, windows=args.windows)
    prompt, decode = bench_tokens(reference.windows[0], reference.windows.shape[1])
    hessians = None
    if args.calibration:
        from edgelm.quant.calibration import activation_covariance, read_calibration_text

        hessians = activation_covariance(args.checkpoint, read_calibration_text(args.calibration))

    print(
        f"{args.checkpoint}: {reference.info.positions:,} scored held-out tokens in "
        f"{reference.info.windows} windows; pp{len(prompt)} and tg{len(decode)} in llama.cpp"
    )
    print(f"{'type':<8} {'quantizer':<22} {'size MB':>8} {'mean KLD':>9} {'pp t/s':>18} {'tg t/s':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.types.split(","):
            files = {
                "llama.cpp": export_gguf_via_llama_cpp(args.checkpoint, Path(tmp) / "llama.cpp", quant),
                "edgelm": export_gguf(args.checkpoint, Path(tmp) / "edgelm", quant),
            }
            if hessians is not None:
                files["edgelm + calibration"] = export_gguf(
                    args.checkpoint, Path(tmp) / "cal", quant, hessians
                )
            results = {}
            timings = speeds(list(files.values()), prompt, decode)
            for (name, path), (pp, tg) in zip(files.items(), timings, strict=True):
                with edgelm.load(path, kv_cache="f32") as model:
                    kld = evaluate(model.runtime, reference).kld_mean.value
                results[name] = (kld, pp, tg)
                size = path.stat().st_size / 1e6
                print(f"{quant:<8} {name:<22} {size:8.2f} {kld:9.5f} {fmt(pp)} {fmt(tg)}")
            base_kld, base_pp, base_tg = results["llama.cpp"]
            for name, (kld, pp, tg) in results.items():
                if name != "llama.cpp":
                    print(
                        f"{'':<8} {name} / llama.cpp: KLD {kld / base_kld:.2f}x, "
                        f"pp {statistics.mean(pp) / statistics.mean(base_pp):.2f}x, "
                        f"tg {statistics.mean(tg) / statistics.mean(base_tg):.2f}x"
                    )


if __name__ == "__main__":
    main()
