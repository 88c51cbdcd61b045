"""`DirectRoute`: endpoints that take only the request are called as they are; any other
endpoint keeps FastAPI's handler (its parameters and dependencies still work)."""

from __future__ import annotations

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.routing import APIRoute

from service.routes import v1, v2
from service.routes.direct import DirectRoute
from tests.support import free_port, serve_app_in_thread


async def answer() -> str:
    return "dependency"


def app_with_routes() -> tuple[FastAPI, dict[str, APIRoute]]:
    router = APIRouter(route_class=DirectRoute)

    @router.post("/raw")
    async def raw(request: Request) -> Response:
        return Response(await request.body(), media_type="text/plain")

    @router.get("/items/{item}")
    async def item(item: int, request: Request, dep: str = Depends(answer)) -> dict[str, object]:
        return {"item": item, "dep": dep, "path": request.url.path}

    app = FastAPI()
    app.include_router(router)
    routes = {r.path: r for r in router.routes if isinstance(r, APIRoute)}
    return app, routes


def test_an_endpoint_of_the_request_alone_is_its_own_handler() -> None:
    app, routes = app_with_routes()
    assert routes["/raw"].get_route_handler() is routes["/raw"].endpoint
    assert routes["/items/{item}"].get_route_handler() is not routes["/items/{item}"].endpoint
    with serve_app_in_thread(app, free_port()) as url, httpx.Client(base_url=url) as client:
        assert client.post("/raw", content=b"abc").text == "abc"
        assert client.get("/items/3").json() == {"item": 3, "dep": "dependency", "path": "/items/3"}
        assert client.get("/items/x").status_code == 422  # FastAPI's validation still runs
    assert {"/raw", "/items/{item}"} <= set(app.openapi()["paths"])


def test_the_inference_routes_are_direct() -> None:
    for router, path in ((v1.router, "/v1/classify"), (v2.router, "/v2/models/{name}/infer")):
        (route,) = [r for r in router.routes if isinstance(r, APIRoute) and r.path == path]
        assert isinstance(route, DirectRoute)
        assert route.get_route_handler() is route.endpoint
