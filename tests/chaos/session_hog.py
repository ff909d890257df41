"""Hold one IPMI session on each of some BMCs until standard input closes.

``python -m tests.chaos.session_hog USER PASSWORD ADDRESS[:PORT]...``: logs in to every
BMC (pyghmi's client, one RMCP+ session each, from this process's own UDP socket), prints
``ready N`` and waits; at end of input it logs out of every session and exits. Several of
these fill a BMC's session table, so that powerq meets "no free session" (RMCP+ status
0x01) from a BMC that is otherwise healthy.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from pyghmi.ipmi import command

    user, password, *targets = argv
    sessions = []
    for target in targets:
        host, _, port = target.partition(":")
        sessions.append(command.Command(bmc=host, userid=user.encode(), password=password.encode(),
                                        port=int(port or 623)))
    print(f"ready {len(sessions)}", flush=True)
    sys.stdin.read()
    for cmd in sessions:
        try:
            cmd.ipmi_session.logout()
        except Exception as exc:  # report and go on: the others still log out
            print(f"logout failed: {type(exc).__name__}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
