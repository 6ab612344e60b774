"""Build eval/heldout.jsonl: evaluation text from sources the bundled calibration set never draws on (deterministic).

    apt-get download rust-doc sqlite3-doc golang-1.19-src debian-reference-zh-cn
    for f in *.deb; do mkdir -p x/${f%%_*}; dpkg -x $f x/${f%%_*}; done
    python scripts/build_heldout.py --debs DIR      # DIR holds the .debs and x/

Four sources, four kinds of text, none of them a source (or a project) of calibration/calib.jsonl:

| source | lang | package | what | licence |
|---|---|---|---|---|
| rust-book | en | rust-doc | "The Rust Programming Language" book: tutorial prose with code | MIT OR Apache-2.0 |
| sqlite-docs | en | sqlite3-doc | SQLite's own documentation pages: reference prose | public domain |
| go-stdlib | code | golang-1.19-src | Go standard library source (no tests, no testdata) | BSD-3-Clause (Go) |
| debian-reference-zh | zh | debian-reference-zh-cn | "Debian Reference" in Simplified Chinese | GPL-2.0-or-later |

Each record is the start of one upstream document (at most CHUNK[lang] characters, cut at a paragraph or line), and
documents are taken evenly spaced over the sorted file list until the source's character budget is reached, so
every source spreads over many documents. eval/HELDOUT.json records each package's version and the sha256 of its
.deb and of every file a record came from; the licences are in eval/licenses/. Output bytes depend only on the
packages (records sorted by source and doc, keys sorted).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_corpora import HAN, html_to_text, paragraphs  # noqa: E402

# characters per record at most: Chinese takes ~1.1 SmolLM2 tokens a character, English ~0.25, code ~0.35
CHUNK = {"en": 6000, "code": 6000, "zh": 2500}
# source: (lang, package, licence tag, char budget, licence file inside the package)
SOURCES = {
    "rust-book": ("en", "rust-doc", "MIT OR Apache-2.0", 70_000, "usr/share/doc/rust-doc/copyright"),
    "sqlite-docs": ("en", "sqlite3-doc", "public-domain", 70_000, "usr/share/doc/sqlite3-doc/copyright"),
    "go-stdlib": ("code", "golang-1.19-src", "BSD-3-Clause", 45_000, "usr/share/doc/golang-1.19-src/copyright"),
    "debian-reference-zh": ("zh", "debian-reference-zh-cn", "GPL-2.0-or-later", 15_000,
                            "usr/share/doc/debian-reference-zh-cn/copyright"),
}


def _cut(text: str, sep: str, size: int) -> str:
    """The first `size` characters of text, ending at the last `sep` inside them."""
    if len(text) <= size:
        return text
    head = text[:size]
    return head[: head.rfind(sep)] if sep in head else head


def rust_book(root: Path):
    for f in sorted((root / "usr/share/doc/rust-doc/html/book").glob("ch[0-9]*.html")):
        yield f, "\n\n".join(paragraphs(html_to_text(f), 40))


def sqlite_docs(root: Path):
    for f in sorted((root / "usr/share/doc/sqlite3").glob("*.html")):
        yield f, "\n\n".join(paragraphs(html_to_text(f), 40))


def go_stdlib(root: Path):
    src = root / "usr/share/go-1.19/src"
    for f in sorted(src.rglob("*.go")):
        rel = f.relative_to(src).as_posix()
        # no tests, no test data, no tools, and no generated tables (z*.go, and files over 60 kB such as entity.go)
        if (f.name.endswith("_test.go") or "testdata" in rel or rel.startswith(("cmd/", "vendor/"))
                or f.name.startswith("z") or f.stat().st_size > 60_000):
            continue
        yield f, f.read_text(encoding="utf-8", errors="replace")


def debian_reference_zh(root: Path):
    for f in sorted((root / "usr/share/debian-reference").glob("*.zh-cn.html")):
        ps = [p for p in paragraphs(html_to_text(f), 20) if len(HAN.findall(p)) > 0.2 * len(p)]
        yield f, "\n\n".join(ps)


READERS = {"rust-book": rust_book, "sqlite-docs": sqlite_docs, "go-stdlib": go_stdlib,
           "debian-reference-zh": debian_reference_zh}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def records(name: str, root: Path) -> tuple[list[dict], dict]:
    lang, _, lic, budget, _ = SOURCES[name]
    docs = [(f, t) for f, t in READERS[name](root) if len(t) >= 1000]
    sep = "\n" if lang == "code" else "\n\n"
    n_docs = max(1, min(len(docs), budget // CHUNK[lang] + 1))
    rows, files, used = [], {}, 0
    # evenly spaced documents, then more if the budget is not reached (short documents)
    order = sorted(range(len(docs)), key=lambda i: ((i * n_docs) % len(docs), i))
    for i in order:
        if used >= budget:
            break
        f, text = docs[i]
        text = _cut(text, sep, CHUNK[lang]).strip()
        rel = f.relative_to(root).as_posix()
        rows.append({"doc": rel, "lang": lang, "license": lic, "source": name, "text": text})
        files[rel] = sha256(f)
        used += len(text)
    return rows, files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debs", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1])
    a = ap.parse_args()
    calib = {json.loads(line)["source"] for line in (a.out / "calibration/calib.jsonl").open(encoding="utf-8")}
    rows, manifest = [], {"file": "eval/heldout.jsonl", "sources": {}}
    for name, (lang, pkg, lic, _, lic_file) in SOURCES.items():
        assert name not in calib, f"{name} is a calibration source"
        deb = next(a.debs.glob(f"{pkg}_*.deb"))
        root = a.debs / "x" / pkg
        got, files = records(name, root)
        rows += got
        (a.out / "eval/licenses").mkdir(parents=True, exist_ok=True)
        (a.out / f"eval/licenses/{name}.txt").write_bytes((root / lic_file).read_bytes())
        manifest["sources"][name] = {
            "lang": lang, "license": lic, "package": pkg, "version": deb.name.split("_")[1],
            "deb_sha256": sha256(deb), "records": len(got), "chars": sum(len(r["text"]) for r in got), "files": files}
    rows.sort(key=lambda r: (r["source"], r["doc"]))
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()
    (a.out / "eval/heldout.jsonl").write_bytes(data)
    manifest["sha256"] = hashlib.sha256(data).hexdigest()
    (a.out / "eval/HELDOUT.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    for name, s in manifest["sources"].items():
        print(f"{name}: {s['records']} records, {s['chars']} chars")


if __name__ == "__main__":
    main()
