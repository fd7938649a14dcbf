"""Parse launcher command lines with the pinned sglang's own parsers (runs in the tools venv, tools/.venv-sglang).

    tools/.venv-sglang/bin/python tools/sglang_parse_check.py < commands.json

stdin: a JSON list of argv lists as `SGLangServers.server_command(i)` / `router_command()` build them. Each
`-m sglang.launch_server ...` goes through `ServerArgs.add_cli_args` + `parse_args`, each
`-m sglang_router.launch_router ...` through `sglang_router.launch_router.parse_router_args`. An unknown or renamed
flag makes argparse exit non-zero with its message. stdout: one JSON object per command with the parsed values.
"""
import argparse
import json
import sys


def parse_server(argv: list) -> dict:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang.launch_server")
    ServerArgs.add_cli_args(parser)
    return vars(parser.parse_args(argv))


def parse_router(argv: list) -> dict:
    from sglang_router.launch_router import parse_router_args

    return vars(parse_router_args(argv))


def main():
    import sglang
    import sglang_router.version

    out = []
    for cmd in json.load(sys.stdin):
        module, argv = cmd[2], cmd[3:]
        parse = {"sglang.launch_server": parse_server, "sglang_router.launch_router": parse_router}[module]
        out.append({"module": module, "args": parse(argv)})
    print(json.dumps({"sglang": sglang.__version__, "sglang_router": sglang_router.version.__version__,
                      "parsed": out}, default=str))


if __name__ == "__main__":
    main()
