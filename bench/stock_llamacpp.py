"""Stock llama.cpp on an exported pair, alone: llama-server plain vs llama-server --spec-type draft-mtp with our
drafter.gguf, over a bench suite, written as a bench document (docs/bench.md schema; `plain` and `speculative`
are the two stock servers). For machines where mtpkit's own loop does not run, such as phones
(devices/android/bench.sh starts the servers there and passes their forwarded URLs). Where mtpkit runs, prefer
`mtpkit bench --backend llamacpp --target DIR/target.gguf --baselines llama_server`: ours and stock in one run.

    python bench/stock_llamacpp.py DIR --json out.json [--bin BIN | --plain-url URL --mtp-url URL]
        [--suite humaneval] [--limit 8] [--max-new-tokens 128] [--temperature 0] [-k 5] [--repeats 2]
        [--threads N] [--machine-json FILE] [--markdown out.md]

Needs no torch: the servers tokenize the prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from mtpkit.bench.llama_server import EXACT_FLAGS, LlamaServer, find_programs, server_command, stock_bench
    from mtpkit.bench.report import markdown
    from mtpkit.bench.runner import machine_info
    from mtpkit.bench.schema import write_json
    from mtpkit.errors import MtpkitError
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pair", help="export directory with target.gguf and drafter.gguf")
    ap.add_argument("--json", required=True, help="write the bench document here")
    ap.add_argument("--markdown", help="write the table here")
    ap.add_argument("--bin", help="llama.cpp's programs (default: $MTPKIT_LLAMACPP_BIN or devices/llamacpp/build.sh's)")
    ap.add_argument("--plain-url", help="a running plain llama-server (e.g. on a phone, through adb forward)")
    ap.add_argument("--mtp-url", help="a running llama-server with --spec-type draft-mtp")
    ap.add_argument("--suite", default="humaneval")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("-k", "--num-draft-tokens", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--gpu", action="store_true", help="offload every layer (-ngl all) when starting servers here")
    ap.add_argument("--machine-json", help="the machine that ran the servers (default: this one)")
    a = ap.parse_args(argv)
    try:
        pair = Path(a.pair)
        target, drafter = pair / "target.gguf", pair / "drafter.gguf"
        for f in (target, drafter):
            if not f.is_file():
                raise MtpkitError(f"{f} not found (mtpkit export --format gguf --out {pair})")
        if (a.plain_url is None) != (a.mtp_url is None):
            raise MtpkitError("--plain-url and --mtp-url go together")
        if a.machine_json:
            machine = json.loads(Path(a.machine_json).read_text())
        else:  # the servers run here
            machine = machine_info("cpu")
            if a.gpu:
                machine["gpu"] = "llama.cpp GPU build, every layer offloaded (-ngl all)"
        servers = []
        try:
            if a.plain_url:
                plain, mtp = LlamaServer(url=a.plain_url), LlamaServer(url=a.mtp_url)
            else:
                b = find_programs(a.bin, gpu=a.gpu)
                if b is None:
                    raise MtpkitError("llama.cpp's programs are not built: devices/llamacpp/build.sh (or --bin)")
                kw = dict(threads=a.threads, n_ctx=4096, k=a.num_draft_tokens, gpu=a.gpu)
                plain = LlamaServer(server_command(b, target, None, **kw))
                servers.append(plain)
                mtp = LlamaServer(server_command(b, target, drafter, **kw))
                servers.append(mtp)
            mb = {"target": {"file": target.name, "mb": round(target.stat().st_size / 2**20, 1)},
                  "drafter": {"file": drafter.name, "mb": round(drafter.stat().st_size / 2**20, 1)}}
            settings = {"target": str(target), "backend": "llama-server", "dtype": "GGUF", "device": None,
                        "threads": a.threads, "num_draft_tokens": a.num_draft_tokens,
                        "server_flags": " ".join(EXACT_FLAGS),
                        "command": "python bench/stock_llamacpp.py " + " ".join(shlex.quote(x) for x in
                                                                               (argv or sys.argv[1:]))}
            doc = stock_bench(plain, mtp, suite=a.suite, limit=a.limit, max_new_tokens=a.max_new_tokens,
                              temperature=a.temperature, seed=a.seed, repeats=a.repeats, machine=machine,
                              settings=settings, models=mb)
        finally:
            for s in servers:
                s.close()
        write_json(doc, a.json)
        table = markdown(doc)
        if a.markdown:
            Path(a.markdown).write_text(table)
        print(table)
    except MtpkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
