"""The web face of the bridge: the page people use from a browser (docs/page.md).

    page.py    GET / and /static/...: the page, its security headers and caching
    static/    index.html, app.js, app.css (plain JavaScript, no build step)

The page talks only to the public /v1 API with the key a person pastes, exactly
as any other client would. The API and the event stream are to move into this
package later.
"""

from __future__ import annotations
