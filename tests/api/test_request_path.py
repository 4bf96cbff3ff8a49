"""The generation routes solve their dependencies on the event loop: FastAPI puts each plain `def` dependency on
its threadpool, a thread hop per request whose GIL hand-offs an eager runner thread pays for (bench/service.py)."""
import fastapi.dependencies.utils as fastapi_deps


def test_generate_runs_no_dependency_on_the_threadpool(client, monkeypatch):
    hops = []
    real = fastapi_deps.run_in_threadpool

    async def counted(call, *args, **kwargs):
        hops.append(getattr(call, "__name__", repr(call)))
        return await real(call, *args, **kwargs)

    monkeypatch.setattr(fastapi_deps, "run_in_threadpool", counted)
    r = client.post("/generate", json={"model": "blobs", "steps": 2, "seed": 1})
    assert r.status_code == 200, r.text
    r = client.post("/v1/images/generations", json={"model": "blobs", "prompt": "", "n": 1})
    assert r.status_code in (200, 400), r.text  # reached the route: its dependencies were solved
    assert hops == []
