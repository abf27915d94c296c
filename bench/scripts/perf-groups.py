#!/usr/bin/env python3
"""Groups a flat `perf report --sort dso,symbol -g none --stdio` output by
where the time goes: kernel, allocator, memory copies, and the Rust crate
that owns each user-space symbol. Usage: perf-groups.py report.txt"""
import re
import sys
from collections import Counter

ALLOCATOR = {"_int_malloc", "_int_free", "malloc", "cfree", "free", "realloc",
             "malloc_consolidate", "unlink_chunk.constprop.0", "calloc",
             "_int_realloc", "__libc_malloc", "__libc_free", "tcache_init",
             "_int_free_merge_chunk", "_int_free_create_chunk", "_int_free_maybe_consolidate"}

def crate_of(symbol):
    s = symbol.lstrip("<&*")
    s = re.sub(r"^(dyn |mut |impl )", "", s)
    name = re.split(r"::|<| as |\s", s, maxsplit=1)[0]
    return name or symbol

groups = Counter()
top_user = Counter()
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*?)\s*$", line)
    if not m:
        continue
    share, dso, kind = float(m.group(1)), m.group(2), m.group(3)
    # Wide reports pad the symbol column and may add columns after it.
    symbol = re.split(r"\s{2,}", m.group(4))[0]
    if kind == "k":
        groups["kernel (TCP/IP over loopback, syscalls, scheduling)"] += share
    elif symbol in ALLOCATOR or symbol.startswith("cfree"):
        groups["glibc malloc/free"] += share
    elif "memmove" in symbol or "memcpy" in symbol or "memset" in symbol:
        groups["libc memcpy/memmove/memset"] += share
    elif "clock_gettime" in symbol:
        groups["clock_gettime (vDSO)"] += share
    elif dso.startswith("libc"):
        groups["libc other"] += share
    else:
        crate = crate_of(symbol)
        groups[f"crate {crate}"] += share
        top_user[symbol[:110]] += share
for name, share in groups.most_common():
    print(f"{share:6.2f}%  {name}")
print("\ntop user-space symbols:")
for name, share in top_user.most_common(15):
    print(f"{share:6.2f}%  {name}")
