"""The share panel of a class gallery: its code, the link that opens it, and a QR code.

The link is built from the address the visitor's browser used (the Host header, or the
proxy's X-Forwarded-Host on a Hugging Face Space), checked to be a plain host name; an
address only this computer can open (127.0.0.1, localhost) is replaced by the computer's
address on the local network, with a note on how to serve the page there.
"""
from __future__ import annotations

import html
import ipaddress
import re
from typing import Any
from urllib.parse import quote

import segno

from sbir_core.gallery.sharing import code_of, format_code, lan_address

DEFAULT_PORT = 7860
_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}"
                      r"[A-Za-z0-9])?(?::\d{1,5})?|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?")


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:host.find("]")]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def page_address(request: Any) -> tuple[str, bool]:
    """(scheme://host:port, whether it is this computer's loopback address) as the visitor's
    browser reached the page; a loopback address is swapped for the network address."""
    headers = getattr(request, "headers", None) or {}
    host = (headers.get("x-forwarded-host") or headers.get("host") or "").split(",")[0].strip()
    proto = (headers.get("x-forwarded-proto") or "").split(",")[0].strip().lower()
    if proto not in ("http", "https"):
        url = getattr(request, "url", None)
        proto = getattr(url, "scheme", "http") if getattr(url, "scheme", "") in ("http", "https") else "http"
    if not _HOST_RE.fullmatch(host):
        host = f"127.0.0.1:{DEFAULT_PORT}"
    loopback = _is_loopback(host)
    if loopback:
        port = host.rsplit(":", 1)[1] if ":" in host and not host.endswith("]") else str(DEFAULT_PORT)
        lan = lan_address()
        if lan:
            host = f"{lan}:{port}"
    return f"{proto}://{host}", loopback


def class_link(code: str, request: Any = None) -> tuple[str, bool]:
    base, loopback = page_address(request)
    return f"{base}/?class={quote(code)}", loopback


def qr_data_uri(text: str) -> str:
    """A QR code as an SVG data URI (nothing written to disk; big enough for a projector)."""
    return segno.make(text, error="m").svg_data_uri(scale=8, border=2)


def share_panel(gallery: Any, name: str, owned: bool, request: Any = None) -> str:
    """HTML for the chosen gallery: for a class gallery, its code, link and QR; else nothing."""
    code = code_of(gallery)
    if code is None:
        return ""
    link, loopback = class_link(code, request)
    note = ("<p class='note'>This page was opened as 127.0.0.1, which only this computer can open. "
            "For students to connect, start the app with <code>python app.py --host 0.0.0.0</code>, "
            "then share the link above.</p>" if loopback else "")
    whose = ("You built this gallery: only this browser can rename or delete it." if owned
             else "Anyone with this code can search this gallery.")
    return (f"<div class='share'><div class='share-text'><p>Class code for <b>{html.escape(name)}</b>:</p>"
            f"<p class='code' aria-label='class code'>{format_code(code)}</p>"
            f"<p>Or open <a href='{html.escape(link)}' target='_blank'>{html.escape(link)}</a></p>"
            f"<p>{whose}</p>{note}</div>"
            f"<img class='qr' alt='QR code of the link' src='{qr_data_uri(link)}' width='240' height='240'></div>")
