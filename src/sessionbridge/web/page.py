"""The page: ``GET /`` and its static files, served with strict security headers.

The files ship inside the package (``static/``) and are read once: they cannot
change while the process runs. The page's own references to its assets carry a
content hash (``/static/app.js?v=<hash>``), so an asset asked for with the current
hash may be cached for a year, while the page itself is revalidated every time:
an upgraded bridge is never shown with last release's script.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from ..errors import NotFound
from .problems import problem_response

STATIC_PREFIX = "/static/"
INDEX_NAME = "index.html"
# Only these files are served: no directory listing, no path from the request
# ever reaches the file system.
ASSET_TYPES = {
    "app.js": "text/javascript",
    "app.css": "text/css",
    "favicon.svg": "image/svg+xml",
}

# Only the page's own origin, and no inline script or style: text from the API
# that slipped into the page as markup could still not run. frame-ancestors
# keeps the page out of other sites' frames (clickjacking of the key form).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
CACHE_REVALIDATE = "no-cache"
CACHE_FINGERPRINTED = "public, max-age=31536000, immutable"

routes = web.RouteTableDef()


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    version: str  # a short content hash: the ETag, and the ?v= of the page's links

    @property
    def etag(self) -> str:
        return self.version


def _version(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:16]


@functools.cache
def assets() -> dict[str, Asset]:
    """Every file of the page, read once, the index with fingerprinted asset links."""
    folder = resources.files(__package__).joinpath("static")
    found: dict[str, Asset] = {}
    for name, content_type in ASSET_TYPES.items():
        body = folder.joinpath(name).read_bytes()
        found[name] = Asset(body, content_type, _version(body))
    index = folder.joinpath(INDEX_NAME).read_text(encoding="utf-8")
    for name, asset in found.items():
        index = index.replace(
            f'"{STATIC_PREFIX}{name}"', f'"{STATIC_PREFIX}{name}?v={asset.version}"'
        )
    body = index.encode("utf-8")
    found[INDEX_NAME] = Asset(body, "text/html", _version(body))
    return found


def _secured(response: web.Response) -> web.Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def _serve(request: web.Request, asset: Asset, cache_control: str) -> web.Response:
    if asset.etag in {etag.value for etag in request.if_none_match or ()}:
        response = web.Response(status=304)
    else:
        response = web.Response(body=asset.body, content_type=asset.content_type)
        if asset.content_type.startswith("text/"):
            response.charset = "utf-8"
    response.etag = asset.etag
    response.headers["Cache-Control"] = cache_control
    return _secured(response)


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    return _serve(request, assets()[INDEX_NAME], CACHE_REVALIDATE)


@routes.get(STATIC_PREFIX + "{name}")
async def static_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    asset = assets().get(name) if name in ASSET_TYPES else None
    if asset is None:
        return _secured(problem_response(NotFound("no such file")))
    # Only a link with the current hash may be kept for good; any other
    # (an old page, a hand-typed URL) is revalidated.
    current = request.query.get("v") == asset.version
    return _serve(request, asset, CACHE_FINGERPRINTED if current else CACHE_REVALIDATE)
