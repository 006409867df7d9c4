"""A record of what the API server itself says happened: every watch event of a collection.

``Watch`` streams ``?watch=1`` of one collection (Jobs, runs) from a thread, stamping
each event with the time it arrived, and survives what a chaos test does to the control
plane: a dropped connection (an API server or etcd restart) resumes from the last
resourceVersion; a ``410 Gone`` (that version was compacted) lists again and resumes from
the list, recording the listed objects as ``LISTED`` events. Bookmarks are asked for, so
a quiet collection keeps a fresh resourceVersion.

    with Watch(plane, "/apis/batch/v1/namespaces/chaos/jobs") as jobs:
        ...
    jobs.events  # [Event(t, type, name, uid, obj), ...]
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    t: float  # time.monotonic() when it arrived
    wall: float  # time.time() then (to line up with the API server's audit log)
    type: str  # ADDED, MODIFIED, DELETED, LISTED
    name: str
    uid: str
    obj: dict[str, Any]


class Watch:
    def __init__(self, plane, path: str, keep_objects: bool = True, project=None):
        """``keep_objects=False`` keeps metadata, spec and status; ``project(obj)`` keeps what it returns."""
        self.plane, self.path, self.keep_objects, self.project = plane, path, keep_objects, project
        self.events: list[Event] = []
        self.reconnects = 0
        self.relists = 0
        self._rv = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._response = None
        self._thread = threading.Thread(target=self._run, name=f"watch {path}", daemon=True)
        self._context = ssl.create_default_context(cafile=str(plane.cluster_dir / "pki" / "ca.crt"))

    def __enter__(self) -> "Watch":
        self._list()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            try:
                response.close()
            except Exception:
                pass
        self._thread.join(10)

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)

    # --- the stream -----------------------------------------------------------------

    def _request(self, query: str, timeout: float):
        request = urllib.request.Request(f"{self.plane.server}{self.path}?{query}",
                                         headers={"Authorization": f"Bearer {self.plane.token}"})
        return urllib.request.urlopen(request, timeout=timeout, context=self._context)

    def _record(self, type_: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        if self.project is not None:
            kept = self.project(obj)
        elif self.keep_objects:
            kept = obj
        else:
            kept = {"metadata": meta, "spec": obj.get("spec"), "status": obj.get("status")}
        with self._lock:
            self.events.append(Event(time.monotonic(), time.time(), type_, meta.get("name", ""),
                                     meta.get("uid", ""), kept))

    def _list(self) -> None:
        while not self._stop.is_set():
            try:
                with self._request("limit=0", timeout=30) as reply:
                    listing = json.loads(reply.read())
                break
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)  # the API server is restarting
        else:
            return
        for obj in listing.get("items") or []:
            self._record("LISTED", obj)
        self._rv = listing["metadata"]["resourceVersion"]

    def _run(self) -> None:
        while not self._stop.is_set():
            query = f"watch=1&allowWatchBookmarks=true&resourceVersion={self._rv}&timeoutSeconds=300"
            try:
                self._response = self._request(query, timeout=330)
                for line in self._response:
                    if self._stop.is_set():
                        return
                    event = json.loads(line)
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:  # too old: list again
                            self.relists += 1
                            self._list()
                        break
                    self._rv = (obj.get("metadata") or {}).get("resourceVersion", self._rv)
                    if kind != "BOOKMARK":
                        self._record(kind, obj)
            except urllib.error.HTTPError as exc:
                if exc.code == 410:
                    self.relists += 1
                    self._list()
                else:
                    time.sleep(0.3)
            except Exception:  # a dropped connection (OSError, a half-read chunk), or stop() closing it
                if self._stop.is_set():
                    return
                time.sleep(0.3)
            self.reconnects += 1
