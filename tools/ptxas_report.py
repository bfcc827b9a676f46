"""Summarise nvcc's -Xptxas=-v output from a build log: one line per (kernel, arch) with registers,
shared memory, stack and spills. Exits non-zero if any kernel spills (ptxas warns; -Werror fails the
build first, this is the second guard and the readable record CI keeps)."""
import re
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def main(log_path, out_path):
    rows, current = [], None
    for line in open(log_path, errors="replace"):
        if m := ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2)}
        elif current and (m := PROPS.search(line)):
            current.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif current and (m := USED.search(line)):
            current.update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
            rows.append(current)
            current = None
    names = demangle([r["kernel"] for r in rows])
    lines = [f"{'arch':7} {'regs':>4} {'smem':>7} {'stack':>5} {'spills':>6}  kernel"]
    for r, name in zip(rows, names):
        spills = r.get("spill_st", 0) + r.get("spill_ld", 0)
        lines.append(f"{r['arch']:7} {r['regs']:4d} {r['smem']:7d} {r.get('stack', 0):5d} {spills:6d}  {name[:150]}")
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    spilling = [r for r in rows if r.get("spill_st", 0) + r.get("spill_ld", 0) > 0]
    archs = sorted({r["arch"] for r in rows})
    print(f"ptxas: {len(rows)} kernel builds for {', '.join(archs) or 'no arch'}; "
          f"{len(spilling)} with spills; report in {out_path}")
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
