"""python -m ui --runs runs [--host 127.0.0.1] [--port 7860] [--share]"""

import argparse

from ui.app import CSS, build_app


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m ui", description="Leaderboard of sweep runs in the browser.")
    p.add_argument("--runs", default="runs", help="folder of runs (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--refresh-s", type=float, default=5.0, help="seconds between live refreshes")
    args = p.parse_args()
    build_app(args.runs, args.refresh_s).launch(server_name=args.host, server_port=args.port, share=args.share,
                                                   css=CSS)


if __name__ == "__main__":
    main()
