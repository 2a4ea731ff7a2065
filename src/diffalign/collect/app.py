"""The labelling page and its JSON API (FastAPI/Starlette), served by uvicorn from `diffalign collect serve`.

Routes: `GET /` the page; `GET /api/next?labeller=` the next pair; `POST /api/label` `{pair_id, choice, labeller}`;
`POST /api/undo` `{labeller}`; `GET /api/summary` progress and quality; `GET /images/<name>` a candidate image — only
names recorded in the store are served (a request can name nothing else in or outside the folder). When a token is
set (always when the server listens beyond localhost), every route needs it as `?token=` or an `X-Token` header.
"""

from __future__ import annotations

import hmac
from importlib.resources import files
from pathlib import Path

from pydantic import BaseModel, Field

from .quality import quality
from .store import CHOICES, LabelStore, PairTaken

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class LabelIn(BaseModel):
    pair_id: int
    choice: str
    labeller: str = Field("anonymous", min_length=1, max_length=80)


class UndoIn(BaseModel):
    labeller: str = Field("anonymous", min_length=1, max_length=80)


def create_app(folder: str | Path, token: str | None = None):
    """The ASGI app over the collection in `folder` (made by `candidates.prepare`)."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    store = LabelStore(folder)
    images = store.image_names()
    app = FastAPI(title="diffalign collect", docs_url=None, redoc_url=None, openapi_url=None)
    page = files("diffalign.collect").joinpath("page.html").read_text()

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token is not None:
            given = request.query_params.get("token") or request.headers.get("x-token") or ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "a valid token is needed (?token=...)"}, status_code=401)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/next")
    def next_pair(labeller: str = "anonymous") -> dict:
        pair = store.next_pair(labeller)
        body = None
        if pair is not None:
            body = {"id": pair.id, "prompt": pair.prompt, "left": f"/images/{pair.left_image}",
                    "right": f"/images/{pair.right_image}"}  # fmt: skip
        return {"pair": body, "progress": store.progress(labeller)}

    @app.post("/api/label")
    def label(item: LabelIn) -> dict:
        if item.choice not in CHOICES:
            raise HTTPException(400, f"`choice` must be one of {list(CHOICES)}")
        try:
            store.label(item.pair_id, item.choice, item.labeller)
        except KeyError:
            raise HTTPException(404, f"no pair {item.pair_id}") from None
        except PairTaken:
            raise HTTPException(409, f"pair {item.pair_id} is already labelled by {item.labeller!r}") from None
        return {"progress": store.progress(item.labeller)}

    @app.post("/api/undo")
    def undo(item: UndoIn) -> dict:
        return {"undone": store.undo(item.labeller), "progress": store.progress(item.labeller)}

    @app.get("/api/summary")
    def summary(labeller: str = "anonymous") -> dict:
        return {"progress": store.progress(labeller), "quality": quality(store.labelled())}

    @app.get("/images/{name:path}")
    def image(name: str):
        if name not in images:  # only what the store recorded: no path reaches anything else
            raise HTTPException(404, "no such image")
        return FileResponse(store.folder / name, media_type="image/png")

    return app
