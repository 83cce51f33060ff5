"""Run every benchmark in turn (about 15 minutes on 2 cores; `make demo` first, for the loss
comparison on the demo features); results in bench/results/. The cross-validation of the
defaults (`python -m bench.cv_defaults`, about 45 minutes) and the full-COCO estimate
(`python -m bench.full_coco`, a few minutes) run on their own."""

from bench import (
    compare_losses,
    faiss_bench,
    image_throughput,
    metrics_bench,
    serve_bench,
    text_runtimes,
    text_throughput,
    train_throughput,
)

if __name__ == "__main__":
    for mod in (image_throughput, text_throughput, text_runtimes, train_throughput, metrics_bench, faiss_bench,
                compare_losses, serve_bench):
        print(f"\n## {mod.__name__}\n")
        mod.main([])
