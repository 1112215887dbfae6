"""Web demo: `python tools/demo.py --ckpt DIR [--host 127.0.0.1] [--port 7860] [--reranker DIR]`.

Three tabs: text -> image (candidates, seed, guidance scale, top-k, reranking), image -> caption
(greedy / beam) and VQA. DIR is a vilg checkpoint folder, its run folder or a pretrained folder
(tools/convert_checkpoint.py to-pretrained). Needs the demo extra:
`pip install -c constraints.txt -e ".[cpu,demo]"`. Serves on 127.0.0.1 unless --host says otherwise
(0.0.0.0 exposes it to the network: there is no authentication).
"""
import argparse
import sys

from ernie_vilg.cli.common import run_or_exit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="vilg checkpoint folder, its run folder, or a pretrained folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    parser.add_argument("--reranker", default="", help="reranker checkpoint for the reranker / both ranking")
    parser.add_argument("--max-candidates", type=int, default=8, help="upper end of the candidates slider")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.exit(2, f"error: --port must be in [1, 65535], got {args.port}\n")
    if args.max_candidates < 1:
        parser.exit(2, f"error: --max-candidates must be >= 1, got {args.max_candidates}\n")

    def run() -> int:
        import os

        # no usage reporting or version checks from a demo that may run offline
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise ModuleNotFoundError('the demo needs gradio: pip install -c constraints.txt -e ".[cpu,demo]"') from None
        from ernie_vilg.demo import Handlers, build_demo
        from ernie_vilg.pipeline import ErnieViLGPipeline

        pipe = ErnieViLGPipeline.from_pretrained(args.ckpt, threads=args.threads)
        reranker = None
        if args.reranker:
            from ernie_vilg.models.reranker import load_reranker

            reranker = load_reranker(args.reranker)
        app = build_demo(Handlers(pipe, reranker, args.max_candidates))
        print(f"serving on http://{args.host}:{args.port}", flush=True)
        app.queue().launch(server_name=args.host, server_port=args.port, show_api=False, share=False,
                           inbrowser=False, quiet=True)
        return 0

    from ernie_vilg.config import ConfigError
    from ernie_vilg.checkpoint_io import CheckpointError

    return run_or_exit(run, (ConfigError, CheckpointError, FileNotFoundError, ModuleNotFoundError, OSError))


if __name__ == "__main__":
    sys.exit(main())
