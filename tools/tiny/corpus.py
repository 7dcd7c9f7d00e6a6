"""The training corpus: Python source files already on this machine (the standard library and
site-packages), deduplicated by content, split into train and held-out by file, with a manifest
of where each file came from and under which licence. Nothing is read from the network."""
import hashlib
import json
import os
import site
import sysconfig
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

MAX_FILE_BYTES = 512 * 1024  # larger .py files are generated tables, not code worth learning
STDLIB_LICENCE = "PSF-2.0"


@dataclass
class SourceFile:
    path: str
    sha256: str
    text: str
    origin: str  # "stdlib" or the distribution that installed it
    held_out: bool = False


def search_roots():
    """The standard library and every site-packages folder of this interpreter, deepest first,
    so a file inside site-packages (itself inside the stdlib folder) is attributed to it."""
    paths = sysconfig.get_paths()
    sites = {paths["purelib"], paths["platlib"], *site.getsitepackages()}
    if site.ENABLE_USER_SITE:
        sites.add(site.getusersitepackages())
    roots = [(Path(p).resolve(), "site") for p in sites if Path(p).is_dir()]
    roots.append((Path(paths["stdlib"]).resolve(), "stdlib"))
    return roots


def _licence(metadata_path):
    """A distribution's licence from its METADATA: License-Expression, else its 'License ::'
    classifiers, else the License field's first line (some put the whole licence text there)."""
    try:
        headers = HeaderParser().parsestr(metadata_path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return "unknown"
    expression = (headers.get("License-Expression") or "").strip()
    if expression:
        return expression
    classifiers = [c.split("::")[-1].strip() for c in headers.get_all("Classifier") or [] if c.startswith("License ::")]
    if classifiers:
        return "; ".join(classifiers)
    value = (headers.get("License") or "").strip()
    return value.splitlines()[0][:80] if value and value.upper() != "UNKNOWN" else "unknown"


def distributions(site_dir):
    """{absolute file path: distribution name} and {distribution name: licence} from the
    *.dist-info RECORD and METADATA files of one site-packages folder."""
    owner, licences = {}, {}
    for info in Path(site_dir).glob("*.dist-info"):
        name = info.name[: -len(".dist-info")].rsplit("-", 1)[0]
        licences[name] = _licence(info / "METADATA")
        try:
            lines = (info / "RECORD").read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            rel = line.split(",", 1)[0]
            if rel.endswith(".py"):
                owner[str((Path(site_dir) / rel).resolve())] = name
    return owner, licences


def _python_files(root, skip):
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if str(Path(folder, d)) not in skip and d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(folder, name)


def _order_key(path):
    """A fixed pseudo-random order that needs no file contents, so only what the corpus keeps is read."""
    return hashlib.sha256(str(path).encode()).hexdigest()


def collect(max_bytes, held_out_per_mille=15, roots=None):
    """Unique UTF-8 Python files, in a pseudo-random order fixed by their paths, until max_bytes
    of text; a file is held out when its content hash falls in the first held_out_per_mille of
    1000 buckets. roots: [(folder, "stdlib" or "site")], default search_roots().
    Returns (files, licences by origin)."""
    roots = search_roots() if roots is None else [(Path(r).resolve(), kind) for r, kind in roots]
    candidates, owners, licences = [], {}, {"stdlib": STDLIB_LICENCE}
    for root, kind in roots:
        if kind == "site":
            owner, found = distributions(root)
            owners.update(owner)
            licences.update(found)
        skip = {str(r) for r, _ in roots if r != root}
        candidates += [(path, kind) for path in _python_files(root, skip)]
    candidates.sort(key=lambda c: _order_key(c[0]))
    files, seen, total = [], set(), 0
    for path, kind in candidates:
        if total >= max_bytes:
            break
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            data = path.read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen or not text.strip():
            continue
        seen.add(digest)
        origin = "stdlib" if kind == "stdlib" else owners.get(str(path.resolve()), "unknown")
        files.append(SourceFile(str(path), digest, text, origin,
                                held_out=int(digest[:8], 16) % 1000 < held_out_per_mille))
        total += len(data)
    if not files:
        raise RuntimeError(f"no Python files found under {', '.join(str(r) for r, _ in roots)}")
    return files, licences


def write_manifest(files, licences, out_dir):
    """manifest.json (counts, bytes and licence per origin) and files.tsv (every file used)."""
    out_dir = Path(out_dir)
    per_origin = {}
    for f in files:
        entry = per_origin.setdefault(f.origin, {"licence": licences.get(f.origin, "unknown"), "files": 0, "bytes": 0})
        entry["files"] += 1
        entry["bytes"] += len(f.text.encode("utf-8"))
    manifest = {
        "source": "Python files of the training machine's standard library and site-packages, "
                  "deduplicated by SHA-256 of their content",
        "files": len(files), "bytes": sum(e["bytes"] for e in per_origin.values()),
        "held_out_files": sum(f.held_out for f in files),
        "origins": dict(sorted(per_origin.items(), key=lambda kv: -kv[1]["bytes"])),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    with open(out_dir / "files.tsv", "w", encoding="utf-8") as tsv:
        tsv.write("sha256\tsplit\torigin\tpath\n")
        for f in files:
            tsv.write(f"{f.sha256}\t{'held_out' if f.held_out else 'train'}\t{f.origin}\t{f.path}\n")
    return manifest
