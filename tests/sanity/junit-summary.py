#!/usr/bin/env python3
"""Prints `N passed, N failed` (and the skipped ones with their reasons) from a JUnit report.

Ginkgo's own summary is not a line CI recognises. Exit status 1 when anything failed, or when
a test was skipped that is not listed in the allowed-skips file given as second argument.
"""
import sys
import xml.etree.ElementTree as ET

report = sys.argv[1]
allowed = []
if len(sys.argv) > 2:
    with open(sys.argv[2]) as f:
        allowed = [l.split("#", 1)[0].strip() for l in f if l.split("#", 1)[0].strip()]

passed = failed = 0
skipped = []
pending = []
for tc in ET.parse(report).iter("testcase"):
    name = tc.get("name", "")
    status = tc.get("status", "")
    if tc.find("failure") is not None or tc.find("error") is not None or status in ("failed", "panicked", "timedout"):
        failed += 1
        msg = (tc.find("failure") if tc.find("failure") is not None else tc.find("error"))
        print(f"FAILED: {name}\n    {(msg.get('message') if msg is not None else '')[:300]}")
    elif status == "pending":
        pending.append(name)
    elif tc.find("skipped") is not None or status == "skipped":
        sk = tc.find("skipped")
        skipped.append((name, sk.get("message", "") if sk is not None else ""))
    else:
        passed += 1

unexpected = 0
for name, why in skipped:
    ok = any(a in name for a in allowed)
    if not ok:
        unexpected += 1
    print(f"{'skipped (allowed)' if ok else 'SKIPPED (not allowed)'}: {name} -- {why}")
for name in pending:
    print(f"pending upstream (marked PIt in csi-sanity itself): {name}")
print(f"{len(skipped)} skipped ({len(skipped) - unexpected} allowed), {len(pending)} pending upstream")
print(f"{passed} passed, {failed + unexpected} failed")
sys.exit(1 if failed or unexpected else 0)
