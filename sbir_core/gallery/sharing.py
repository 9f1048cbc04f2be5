"""Class galleries: galleries a teacher builds once and shares with a short code.

Each lives in its own folder `<root>/<CODE>/` (root: `$SBIR_HOME/class-galleries`) with
`images/`, `index/` and `share.json` (its name, who owns it, when it was made). Two secrets:

- the **class code** (10 characters from 30 letters and digits that cannot be mixed up when
  read aloud or off a projector: no 0/O, 1/I/L, U; about 49 bits) opens it: whoever has the
  code can search it. The code is the folder's name only after a strict check, so a
  client's text is never a path;
- the **owner token** (32 hex digits, kept by the builder's browser or printed by the
  command line) changes or deletes it. The server keeps only its SHA-256.

Bounds: galleries built in the page count towards MAX_SHARED (least recently used go
first, but one used in the last KEEP_IF_USED_WITHIN seconds is never removed: the build is
refused instead) and MAX_PER_OWNER (the next build is refused). Galleries the operator
builds with the command line are `pinned`: they count towards neither and are never removed.

Filesystem only (no model): the command line lists, renames and deletes without loading one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from sbir_core.errors import InputError
from sbir_core.paths import PathLike, home


CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTVWXYZ"  # no 0 O 1 I L U: nothing to confuse aloud
CODE_LENGTH = 10  # 30**10 ~ 6e14 codes (49 bits): unguessable, still quick to type
CLASS_PREFIX = "class:"  # gallery ids of class galleries: class:<CODE>
SHARE_FILE = "share.json"
USED_FILE = "used"  # its modification time is the gallery's last use

MAX_SHARED = 32  # galleries built in the page, on the whole server
MAX_PER_OWNER = 8  # galleries one owner token may have built in the page
KEEP_IF_USED_WITHIN = 3600  # seconds: a gallery a class is using is never removed for a new one
TOUCH_EVERY = 300  # seconds between two writes of a gallery's last use

_CODE_RE = re.compile(f"[{CODE_ALPHABET}]{{{CODE_LENGTH}}}")
_OWNER_RE = re.compile(r"[0-9a-f]{32}")

BAD_CODE = "That is not a class code: a code has 10 letters and digits, like ABCDE-23456."
NO_SUCH_CODE = "No gallery has that class code. Check it with your teacher (letters and digits, no O or I)."
NOT_OWNER = "Only the person who built this gallery can change or delete it."


class ShareError(InputError):
    """A class code or owner token that does not fit, or a limit reached (plain text)."""


def new_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def new_owner_token() -> str:
    return secrets.token_hex(16)


def parse_code(text: object) -> str:
    """What a person typed (any case, spaces or dashes, a whole link) -> the code, or
    ShareError. The only way a client's text becomes part of a folder name."""
    if not isinstance(text, str) or len(text) > 300:
        raise ShareError(BAD_CODE)
    m = re.search(r"[?&]class=([^&#\s]*)", text)  # a pasted link
    raw = m.group(1) if m else text
    code = re.sub(r"[\s\-]", "", raw).upper()
    if not _CODE_RE.fullmatch(code):
        raise ShareError(BAD_CODE)
    return code


def format_code(code: str) -> str:
    """ABCDEFGHJK -> ABCDE-FGHJK, easier to read aloud."""
    return f"{code[:5]}-{code[5:]}"


def gallery_id(code: str) -> str:
    return CLASS_PREFIX + code


def code_of(gid: object) -> Optional[str]:
    """The code in a gallery id `class:<CODE>`, or None when it is not one."""
    if isinstance(gid, str) and gid.startswith(CLASS_PREFIX):
        code = gid[len(CLASS_PREFIX):]
        if _CODE_RE.fullmatch(code):
            return code
    return None


def lan_address() -> Optional[str]:
    """This computer's address on the local network (no packet is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def owner_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def valid_owner(token: object) -> bool:
    return isinstance(token, str) and bool(_OWNER_RE.fullmatch(token))


@dataclass
class ShareInfo:
    code: str
    name: str
    owner_sha256: str
    created: float
    pinned: bool = False  # built by the operator: never removed to make room

    def owned_by(self, token: object) -> bool:
        return valid_owner(token) and secrets.compare_digest(owner_hash(str(token)), self.owner_sha256)


class ClassGalleries:
    """The class galleries on disk: create, find, rename, delete, and keep them bounded."""

    def __init__(self, root: Optional[PathLike] = None) -> None:
        self.root = Path(root).resolve() if root else (home() / "class-galleries").resolve()
        self._lock = threading.RLock()
        self._touched: dict[str, float] = {}

    def folder(self, code: str) -> Path:
        if not _CODE_RE.fullmatch(code or ""):
            raise ShareError(BAD_CODE)
        return self.root / code

    def read(self, code: str) -> Optional[ShareInfo]:
        """The gallery's share record, or None when no gallery has that code."""
        try:
            data = json.loads((self.folder(code) / SHARE_FILE).read_text(encoding="utf-8"))
            return ShareInfo(**{k: data[k] for k in ("code", "name", "owner_sha256", "created", "pinned")})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def get(self, code: str) -> ShareInfo:
        info = self.read(code)
        if info is None:
            raise ShareError(NO_SUCH_CODE)
        return info

    def _write(self, info: ShareInfo) -> None:
        d = self.folder(info.code)
        tmp = d / f".{SHARE_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps(asdict(info), indent=1), encoding="utf-8")
        os.replace(tmp, d / SHARE_FILE)

    def all(self) -> list[ShareInfo]:
        if not self.root.is_dir():
            return []
        infos = (self.read(p.name) for p in self.root.iterdir() if _CODE_RE.fullmatch(p.name))
        return sorted((i for i in infos if i is not None), key=lambda i: i.created)

    def owned(self, token: object) -> list[ShareInfo]:
        return [i for i in self.all() if i.owned_by(token)] if valid_owner(token) else []

    def last_used(self, code: str) -> float:
        d = self.folder(code)
        for f in (d / USED_FILE, d / SHARE_FILE):
            try:
                return f.stat().st_mtime
            except OSError:
                continue
        return 0.0

    def touch(self, code: str) -> None:
        """Record a use (at most once every TOUCH_EVERY seconds: searches are frequent)."""
        now = time.time()
        if now - self._touched.get(code, 0.0) < TOUCH_EVERY:
            return
        self._touched[code] = now
        try:
            (self.folder(code) / USED_FILE).touch()
        except OSError:
            pass

    def reserve(self, name: str, owner: str, pinned: bool = False) -> tuple[ShareInfo, bool]:
        """The gallery `owner` calls `name` (rebuilt in place, same code), or a new one.
        -> (its record, whether it is new). Makes room under the limits, or ShareError."""
        if not valid_owner(owner):
            raise ShareError("This page has lost its owner key; reload the page and try again.")
        with self._lock:
            mine = self.owned(owner)
            for info in mine:
                if info.name == name:
                    (self.folder(info.code) / USED_FILE).touch()  # a rebuild is a use
                    return info, False
            if not pinned:
                if sum(1 for i in mine if not i.pinned) >= MAX_PER_OWNER:
                    raise ShareError(f"You already have {MAX_PER_OWNER} galleries. Delete one you no longer "
                                     "need, or build again with the name of one of them to replace it.")
                self._make_room(MAX_SHARED - 1)
            self.root.mkdir(parents=True, exist_ok=True)
            while True:
                code = new_code()
                try:
                    self.folder(code).mkdir()
                    break
                except FileExistsError:  # astronomically rare; just draw again
                    continue
            info = ShareInfo(code=code, name=name, owner_sha256=owner_hash(owner), created=time.time(),
                             pinned=pinned)
            self._write(info)
            return info, True

    def _make_room(self, keep: int) -> None:
        """Remove least recently used page-built galleries until at most `keep` are left;
        ShareError when that would remove one used within KEEP_IF_USED_WITHIN."""
        shared = sorted((i for i in self.all() if not i.pinned), key=lambda i: self.last_used(i.code))
        excess = shared[: max(0, len(shared) - keep)]
        if any(time.time() - self.last_used(i.code) < KEEP_IF_USED_WITHIN for i in excess):
            raise ShareError(f"This server already holds {MAX_SHARED} galleries that are in use. "
                             "Try again in an hour, or ask whoever runs it to make room.")
        for info in excess:
            self._remove(info.code)

    def _remove(self, code: str) -> None:
        d = self.folder(code)
        # Rename first, so that a half-deleted folder is never taken for a gallery.
        trash = self.root / f".deleted-{code}-{secrets.token_hex(4)}"
        try:
            os.replace(d, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)
        self._touched.pop(code, None)

    def abandon(self, code: str) -> None:
        """Remove a gallery whose first build failed (no owner check: the caller reserved it)."""
        with self._lock:
            self._remove(code)

    def check_owner(self, code: str, owner: object) -> ShareInfo:
        info = self.get(code)
        if not info.owned_by(owner):
            raise ShareError(NOT_OWNER)
        return info

    def delete(self, code: str, owner: object) -> ShareInfo:
        with self._lock:
            info = self.check_owner(code, owner)
            self._remove(code)
            return info

    def rename(self, code: str, name: str, owner: object) -> ShareInfo:
        if not name:
            raise ShareError("Give the gallery a name (letters, digits, _ or -).")
        with self._lock:
            info = self.check_owner(code, owner)
            if any(i.name == name and i.code != code for i in self.owned(owner)):
                raise ShareError(f"You already have a gallery called “{name}”.")
            info.name = name
            self._write(info)
            return info
