"""`tdm-r1 label`'s web server: the labelling page and its JSON API over a run's label store (aiohttp, as the reward
server).

Every labeller has a token (`tdm-r1 label --run RUN --add-labeller NAME` prints it); the page reads it from its URL
fragment (`/#token=...`, never sent to the server or written to its log) and sends it as a bearer token. Routes:

  GET  /                      the page (no token: it holds no data)
  GET  /api/state             bearer: the trainer's state, this labeller's name, the newest epoch's images with
                              their prompts and this labeller's labels, progress (labelled / needed)
  GET  /api/image/<id>        bearer: one image's PNG, by id (e<epoch>-<position>-<hex>; nothing else reaches the
                              store, and the store holds the bytes: no request names a file)
  POST /api/label             bearer: {"id", "label": 0 | 1}
  POST /api/undo              bearer: take back this labeller's last label
  GET  /health                no token: status, epoch, progress

401 without or with an unknown token, 400 for malformed JSON or fields (naming them), 404 for an unknown image, 413
for a body over 4 KB. State changes only by POST.
"""

from __future__ import annotations

import asyncio
import json
import re
from importlib.resources import files

from tdm_r1.labels.store import LabelError, LabelStore
from tdm_r1.serving import json_error

ID = re.compile(r"e\d{5}-\d{5}-[0-9a-f]{12}")
MAX_BODY = 4096


class LabelService:
    def __init__(self, store: LabelStore, max_requests: int = 0):
        self.store = store
        self.max_requests = max_requests  # > 0: stop after this many API answers (tests)
        self.answered = 0
        self.stop: asyncio.Event | None = None

    def _labeller(self, request) -> str | None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        return self.store.labeller_of(auth[len("Bearer ") :].strip())

    def _counted(self, handler):
        async def wrapped(request):
            try:
                who = self._labeller(request)
                if who is None:
                    return json_error(401, "missing or unknown labeller token", headers={"WWW-Authenticate": "Bearer"})
                return await handler(request, who)
            finally:
                self.answered += 1
                if self.max_requests and self.answered >= self.max_requests and self.stop is not None:
                    self.stop.set()

        return wrapped

    def progress(self) -> dict:
        state = self.store.state()
        epoch = state.get("epoch", self.store.latest_epoch())
        done, total = self.store.progress(epoch) if epoch is not None else (0, 0)
        return {"epoch": epoch, "labelled": done, "total": total, "needed": state.get("needed", total),
                "status": state.get("status", "idle")}  # fmt: skip

    # -- routes ---------------------------------------------------------------------------------------------------

    async def page(self, request):
        from aiohttp import web

        html = files("tdm_r1.labels").joinpath("page.html").read_text()
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def health(self, request):
        from aiohttp import web

        return web.json_response({"status": "ok"} | {"progress": self.progress()})

    async def state(self, request, who: str):
        from aiohttp import web

        progress = self.progress()
        epoch = progress["epoch"]
        images = self.store.images(epoch) if epoch is not None else []
        mine = self.store.labels_of(who, epoch) if epoch is not None else {}
        items = [{"id": im.id, "prompt": im.prompt, "label": mine.get(im.id)} for im in images]
        return web.json_response({"labeller": who, "progress": progress, "images": items})

    async def image(self, request, who: str):
        from aiohttp import web

        image_id = request.match_info["id"]
        png = self.store.png(image_id) if ID.fullmatch(image_id) else None
        if png is None:
            return json_error(404, f"no image {image_id[:40]!r}")
        return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    async def _body(self, request) -> dict:
        from aiohttp import web

        if request.content_length is not None and request.content_length > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
        raw = await request.read()
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LabelError(f"body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise LabelError("body must be a JSON object")
        return body

    async def label(self, request, who: str):
        from aiohttp import web

        try:
            body = await self._body(request)
            image_id, label = body.get("id"), body.get("label")
            if not isinstance(image_id, str) or not ID.fullmatch(image_id):
                raise LabelError(f"field 'id': expected an image id, got {str(image_id)[:40]!r}")
            if label not in (0, 1) or isinstance(label, bool):
                raise LabelError(f"field 'label': expected 0 (dislike) or 1 (like), got {str(label)[:20]!r}")
            if self.store.png(image_id) is None:
                return json_error(404, f"no image {image_id!r}")
            self.store.label(image_id, who, label)
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, f"request body over {MAX_BODY} bytes")
        except LabelError as e:
            return json_error(400, str(e))
        return web.json_response({"ok": True, "progress": self.progress()})

    async def undo(self, request, who: str):
        from aiohttp import web

        try:
            await self._body(request)
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, f"request body over {MAX_BODY} bytes")
        except LabelError as e:
            return json_error(400, str(e))
        return web.json_response({"undone": self.store.undo(who), "progress": self.progress()})


def build_app(service: LabelService):
    from aiohttp import web

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_get("/", service.page)
    app.router.add_get("/health", service.health)
    app.router.add_get("/api/state", service._counted(service.state))
    app.router.add_get("/api/image/{id}", service._counted(service.image))
    app.router.add_post("/api/label", service._counted(service.label))
    app.router.add_post("/api/undo", service._counted(service.undo))

    async def on_startup(app):
        service.stop = asyncio.Event()

    app.on_startup.append(on_startup)
    return app
