"""The admin HTTP API's plumbing: who is asking, what they may do, errors, routes,
metrics.

Authentication
--------------
A request carries an API key (``tlkey-api-<prefix>-<secret>``) or, on ``/api/v2``, an
OAuth access token, as ``Authorization: Bearer …`` or as the user name of HTTP Basic
(what Tailscale's API clients send). A key is found by its public prefix and its secret
compared by hash in constant time; an unknown prefix costs the same comparison. A key
that was expired or deleted, is past its expiration or whose user is gone gets 401.

Every change a request makes goes through the same admin operations as the CLI's
socket (:class:`projections.admin.AdminOps`), so the log is the same whichever door
was used; the actor is ``api:<prefix>`` followed by ``/<owner's user id>`` when the
key belongs to a user (logs written before that spelling say ``apikey:``); OAuth
tokens: ``oauthclient:<client id>``, the same way.

Each request is one cause (:func:`eventlog.caused_by`): the events it appends share a
correlation id, and carry the reason given in the optional ``X-Tailledger-Reason``
header (one line, the CLI's ``--reason``).

Permissions
-----------
A key's role is ``admin`` or ``member``; a user's own role caps it (an admin key of a
user who was made a member acts as a member). Admins see and change everything; a
member sees and changes only its user's nodes and pre-auth keys (others' are "not
found", so their existence does not leak) and nothing tailnet-wide (403). OAuth tokens
are tailnet-wide but limited to their scopes: a missing scope is 403.

Node lists
----------
A node list (``GET /api/v2/tailnet/-/devices``, ``GET /api/v1/node``) of a large
tailnet is megabytes of JSON. :meth:`Ctx.node_list` keeps the encoded answer per
(route, log position, presence version, whose nodes, query), so a list asked again
before anything changed is sent as it is, and builds a new one in a worker thread
(concurrent requests for the same one wait for it), so the trio loop, which also
serves thousands of map streams and their keep-alives, is never held for a whole
list. The presence is read while the list is built: a list may show presence newer
than its key, never older.

A kept list also keeps its ETag (a hash of the JSON) and, once a client that accepts
gzip asked for it (``Accept-Encoding``: what aiohttp, httpx, browsers and
``curl --compressed`` send), its gzip variant, compressed once in a worker thread
(zlib gives the GIL up while it compresses, so the trio loop runs meanwhile). A list
answer says ``Vary: Accept-Encoding``; it is gzip when the client accepts gzip
(:func:`accepts_gzip`), the JSON as it is otherwise, and ``304 Not Modified`` (no body)
when ``If-None-Match`` names its ETag. Either body goes to hypercorn as one ``bytes``
object, written with one ``send_all``: for 5,000 nodes the gzip variant is about
550 KB, against 3.2 MB (v2) and 5.1 MB (v1) of JSON.

Errors are RFC 7807 problem documents (``application/problem+json``). A refused
request appends nothing: every check happens before the operation runs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
import trio
from quart import Response, request

from eventlog import Actor, ActorKind, caused_by, check_reason
from projections import commands as c
from projections.errors import CommandError, ConflictError, NotFoundError, UnavailableError
from projections.state import ApiKey, Node, TailnetState

from .schema import Problem

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from projections import Tailnet
    from projections.admin import AdminOps
    from projections.presence import PresenceTable

    from ..config import Config

__all__ = [
    "ApiError",
    "ApiService",
    "Ctx",
    "NodeList",
    "Principal",
    "Route",
    "accepts_gzip",
    "etag_matches",
]

log = logging.getLogger("tailledger.api")

T = TypeVar("T")

#: How long an OAuth access token lives (Tailscale's: one hour).
TOKEN_LIFETIME: Final = timedelta(hours=1)
TOKEN_PREFIX: Final = "tlkey-oauthtok-"
#: The optional header that gives a request's reason, stored with each event it
#: appends (the CLI's ``--reason``).
REASON_HEADER: Final = "X-Tailledger-Reason"
#: Bodies above this are refused before they are parsed.
MAX_BODY_BYTES: Final = 1 << 20

_encoder: Final = msgspec.json.Encoder()


class ApiError(Exception):
    """A refusal, answered as a problem document with ``status``."""

    def __init__(self, status: int, detail: str, *, title: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or _TITLES.get(status, "Error")


_TITLES: Final = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    412: "Precondition Failed",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    503: "Service Unavailable",
}


def problem_response(status: int, detail: str, title: str | None = None) -> Response:
    body = Problem(title=title or _TITLES.get(status, "Error"), status=status, detail=detail, message=detail)
    return Response(_encoder.encode(body), status=status, content_type="application/problem+json")


def from_command_error(exc: CommandError) -> ApiError:
    """The HTTP status of a refused command."""
    if isinstance(exc, NotFoundError):
        return ApiError(404, str(exc))
    if isinstance(exc, ConflictError):
        return ApiError(409, str(exc))
    if isinstance(exc, UnavailableError):
        return ApiError(503, str(exc))
    return ApiError(400, str(exc))


@dataclass(frozen=True)
class Principal:
    """Who a request acts as."""

    actor: Actor
    role: str  # effective: "admin" or "member"
    user_id: int | None
    #: OAuth scopes; ``None`` for API keys (their role decides).
    scopes: tuple[str, ...] | None = None
    key_id: int = 0

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def sees_user(self, user_id: int | None) -> bool:
        return self.is_admin or (user_id is not None and user_id == self.user_id)


@dataclass
class _Token:
    client_id: int
    client_prefix: str
    scopes: tuple[str, ...]
    expires: datetime


@dataclass
class ApiStats:
    """Requests by route template, method and status, and time spent per route."""

    requests: dict[tuple[str, str, int], int] = field(default_factory=dict)
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    #: Node lists built, by route template (the other answers were kept ones).
    node_lists_built: dict[str, int] = field(default_factory=dict)
    #: Node list bytes sent, by content coding ("gzip" or "identity").
    node_list_bytes: dict[str, int] = field(default_factory=dict)

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.seconds[(route, method)] = self.seconds.get((route, method), 0.0) + seconds


Handler = Callable[["Ctx"], Awaitable[Any]]


#: Encoded node lists kept (each is up to a few MB for 5,000 nodes, and a sixth to a
#: ninth of that for its gzip variant).
NODE_LISTS_KEPT: Final = 8
#: The zlib level of a node list's gzip variant (compressed once per kept list).
GZIP_LEVEL: Final = 6


@dataclass(eq=False)
class NodeList:
    """A node list as kept (see "Node lists" in the module docstring): the JSON, the
    ETag of that JSON and of its gzip variant, and the gzip variant once a client that
    accepts gzip asked for it.

    Invariant: ``gzip`` is ``None`` or the gzip of ``body``; it is set once.
    """

    body: bytes
    etag: str
    gzip_etag: str
    gzip: bytes | None = None
    #: Set while a worker thread compresses ``body`` (see :meth:`gzipped`).
    _compressing: trio.Event | None = None

    @classmethod
    def of(cls, body: bytes, *, gzipped: bool) -> NodeList:
        """A kept list of the JSON ``body`` (and its gzip variant with ``gzipped``).
        CPU-bound: called in a worker thread, it hashes and compresses with the GIL
        released (hashlib and zlib do for large inputs)."""
        tag = hashlib.blake2b(body, digest_size=12).hexdigest()
        return cls(body, f'"{tag}"', f'"{tag}-gzip"', _gzip(body) if gzipped else None)

    async def gzipped(self) -> bytes:
        """The gzip variant, compressed in a worker thread the first time (concurrent
        callers wait for that one compression)."""
        while self.gzip is None:
            compressing = self._compressing
            if compressing is not None:
                await compressing.wait()
                continue
            compressing = self._compressing = trio.Event()
            try:
                self.gzip = await trio.to_thread.run_sync(_gzip, self.body)
            finally:
                self._compressing = None
                compressing.set()
        return self.gzip


def _gzip(body: bytes) -> bytes:
    # wbits 31: a gzip member (header and CRC), as Content-Encoding: gzip wants.
    return zlib.compress(body, GZIP_LEVEL, wbits=31)


def accepts_gzip(header: str | None) -> bool:
    """Whether an ``Accept-Encoding`` header accepts gzip (RFC 9110, 12.5.3): ``gzip``
    (or ``x-gzip``) with a q-value above 0, or else ``*`` with one. No header: no."""
    if not header:
        return False
    star = False
    for item in header.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        if coding in ("gzip", "x-gzip"):
            return q > 0  # an explicit entry wins over "*", wherever it stands
        if coding == "*":
            star = q > 0
    return star


def etag_matches(header: str, *etags: str) -> bool:
    """Whether an ``If-None-Match`` header names one of ``etags`` or is ``*`` (weak
    comparison, as RFC 9110 13.1.2 asks for this header)."""
    for item in header.split(","):
        tag = item.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag in etags:
            return True
    return False


@dataclass(frozen=True)
class Route:
    """One operation: its path (OpenAPI template), types and requirements."""

    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    response: Any = None  # a msgspec type; None: no JSON body (see ``content_type``)
    body: Any = None  # the request body's msgspec type, if any
    scope: str | None = None  # the OAuth scope it needs (v2)
    #: Other scopes that let a token reach the handler, which then checks the one
    #: the request needs (:meth:`Ctx.require_scope`).
    also_scopes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    auth: bool = True
    api: str = "v1"
    status: int = 200
    content_type: str = "application/json"
    query: tuple[str, ...] = ()


class Ctx:
    """What a handler gets: the service, the principal, path parameters, the body."""

    def __init__(
        self, service: ApiService, principal: Principal, params: Mapping[str, str], body: bytes, route: Route
    ) -> None:
        self.service = service
        self.principal = principal
        self.params = params
        self.raw_body = body
        self.route = route
        self.headers: dict[str, str] = {}
        #: The state a node list is being built from (see :meth:`node_list`).
        self._pinned: TailnetState | None = None

    @property
    def state(self) -> TailnetState:
        return self._pinned if self._pinned is not None else self.service.tailnet.state

    @property
    def actor(self) -> Actor:
        return self.principal.actor

    def query(self, name: str) -> str | None:
        value = request.args.get(name)
        return value if value else None

    def body(self, type_: type[T]) -> T:
        """The JSON body as ``type_``; 400 for malformed or mistyped JSON."""
        raw = self.raw_body.strip() or b"{}"
        try:
            return msgspec.json.decode(raw, type=type_)
        except msgspec.ValidationError as exc:
            raise ApiError(400, f"invalid request body: {exc}") from None
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"malformed JSON: {exc}") from None

    def require_admin(self) -> None:
        if not self.principal.is_admin:
            raise ApiError(403, "this needs an admin key; a member key manages only its own user's nodes and keys")

    def has_scope(self, scope: str) -> bool:
        """Whether the principal holds ``scope`` (API keys are not limited by scopes)."""
        scopes = self.principal.scopes
        return scopes is None or c.scope_grants(scopes, scope)

    def require_scope(self, scope: str) -> None:
        """403 unless a token holds ``scope`` (API keys are not limited by scopes)."""
        if not self.has_scope(scope):
            raise ApiError(403, f"this token lacks the scope {scope!r}")

    def node(self, ref: str) -> Node:
        """A node the principal may see, by id (404 otherwise)."""
        node = None
        if ref.isascii() and ref.isdigit() and len(ref) <= 18:
            node = self.state.nodes.get(int(ref))
        elif ref.startswith("n") and ref[1:].isascii() and ref[1:].isdigit() and len(ref) <= 19:
            node = self.state.nodes.get(int(ref[1:]))  # a v2 stable node id
        if node is None or not self.principal.sees_user(node.user_id):
            raise ApiError(404, f"node {ref!r} not found")
        return node

    async def node_list(self, build: Callable[[list[Node]], msgspec.Struct], *query: Hashable) -> NodeList:
        """The visible nodes, made into an answer by ``build`` and encoded: kept per
        (route, log position, presence version, principal's visibility, ``query``)
        and built in a worker thread (see "Node lists" in the module docstring), with
        its gzip variant when this request accepts gzip. ``build`` may read only
        immutable state and the presence."""
        presence = self.service.presence
        state = self.state
        key = (self.route.operation_id, state.seq, presence.version,
               None if self.principal.is_admin else self.principal.user_id, query)
        lists = self.service.node_lists
        while (found := lists.get(key)) is not None:
            if isinstance(found, NodeList):
                lists.move_to_end(key)
                return found
            await found.wait()  # somebody builds it
            if key not in lists:  # their build failed: build it ourselves
                break
        building = trio.Event()
        lists[key] = building
        try:
            nodes = self.visible_nodes()
            self._pinned = state  # the thread reads the state of the key, not a newer one
            gzipped = accepts_gzip(request.headers.get("Accept-Encoding"))

            def make() -> NodeList:
                return NodeList.of(msgspec.json.encode(build(nodes)), gzipped=gzipped)

            body = await trio.to_thread.run_sync(make)
        except BaseException:
            del lists[key]
            raise
        finally:
            self._pinned = None
            building.set()
        lists[key] = body
        lists.move_to_end(key)
        built = self.service.stats.node_lists_built
        built[self.route.path] = built.get(self.route.path, 0) + 1
        while sum(isinstance(v, NodeList) for v in lists.values()) > NODE_LISTS_KEPT:
            oldest = next(k for k, v in lists.items() if isinstance(v, NodeList))
            del lists[oldest]
        return body

    async def node_op(
        self, param: str, op: str, args: Mapping[str, object] | None = None, *, admin: bool = False
    ) -> Node:
        """Run the admin operation ``op`` on the node the path parameter ``param`` names
        (one the principal may see, 404 otherwise; with ``admin``, then 403 unless the
        principal is an admin); return the node as it was before."""
        node = self.node(self.params[param])
        if admin:
            self.require_admin()
        await self.op(op, {"node": str(node.id), **(args or {})})
        return node

    def visible(self, find: Callable[[TailnetState, str], T], ref: str, owner: Callable[[T], int | None], what: str) -> T:
        """What ``find`` finds by ``ref`` if the principal may see its ``owner``'s things.

        Raises:
            ApiError: 404 when it is not found or not the principal's to see.
        """
        try:
            found: T | None = find(self.state, ref)
        except NotFoundError:
            found = None
        if found is None or not self.principal.sees_user(owner(found)):
            raise ApiError(404, f"{what} {ref!r} not found")
        return found

    def visible_nodes(self) -> list[Node]:
        nodes = sorted(self.state.nodes.values(), key=lambda n: n.id)
        if self.principal.is_admin:
            return nodes
        return [n for n in nodes if n.user_id == self.principal.user_id]

    async def op(self, name: str, args: dict[str, object]) -> Any:
        """Run an admin operation (the CLI's) as the principal."""
        try:
            return await self.service.ops.dispatch(name, args, self.actor)
        except CommandError as exc:
            raise from_command_error(exc) from None

    def is_online(self, node_id: int) -> bool:
        p = self.service.presence.get(node_id)
        return bool(p is not None and p.online)

    def last_seen(self, node_id: int) -> datetime | None:
        p = self.service.presence.get(node_id)
        return p.last_seen if p is not None else None


class ApiService:
    """The API of one server: credentials, tokens, routes, stats.

    Args:
        tailnet: the command side (its state and clock).
        ops: the admin operations every change goes through (the CLI's).
        presence: who is online.
        config: the configuration (``[dns]``).
    """

    def __init__(self, tailnet: Tailnet, ops: AdminOps, presence: PresenceTable, config: Config) -> None:
        self.tailnet = tailnet
        self.ops = ops
        self.presence = presence
        self.config = config
        self.stats = ApiStats()
        self.routes: list[Route] = []
        self._tokens: dict[str, _Token] = {}
        self.version = package_version()
        #: Node lists, encoded or being built (see :meth:`Ctx.node_list`).
        self.node_lists: OrderedDict[Hashable, NodeList | trio.Event] = OrderedDict()

    # -- credentials ---------------------------------------------------------------------

    def now(self) -> datetime:
        return self.tailnet.clock()

    def authenticate(self, header: str | None, *, allow_tokens: bool) -> Principal:
        """The principal of an ``Authorization`` header.

        Raises:
            ApiError: 401 for a missing, unknown, expired or revoked credential.
        """
        credential = _credential(header)
        if credential is None:
            raise ApiError(401, "authentication required: send an API key as a Bearer token")
        if credential.startswith(TOKEN_PREFIX):
            if not allow_tokens:
                raise ApiError(401, "OAuth access tokens are for /api/v2; /api/v1 takes API keys")
            return self._token_principal(credential)
        parsed = c.parse_api_key(credential)
        state = self.tailnet.state
        key = None
        if parsed is not None and parsed[0] == "apikey":
            key = _key_by_prefix(state, parsed[1], "apikey")
        secret = parsed[2] if parsed is not None else credential
        if not _secret_matches(key, secret) or key is None:
            raise ApiError(401, "invalid API key")
        why = key.usable_at(self.now())
        if why is not None:
            raise ApiError(401, f"invalid API key: {why}")
        role, actor_id = _acting_for_owner(state, key, "invalid API key: its user no longer exists")
        return Principal(
            actor=Actor(kind=ActorKind.API, id=actor_id), role=role, user_id=key.user_id, key_id=key.id
        )

    def _token_principal(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode()).hexdigest()
        entry = self._tokens.get(digest)
        now = self.now()
        if entry is None or entry.expires <= now:
            self._tokens.pop(digest, None)
            raise ApiError(401, "invalid or expired access token")
        state = self.tailnet.state
        client = state.api_keys.get(entry.client_id)
        if client is None or client.usable_at(now) is not None:
            self._tokens.pop(digest, None)
            raise ApiError(401, "the OAuth client of this token was expired or deleted")
        role, actor_id = _acting_for_owner(state, client, "the OAuth client's user no longer exists")
        return Principal(
            actor=Actor(kind=ActorKind.OAUTH_CLIENT, id=actor_id),
            role=role,
            user_id=client.user_id,
            scopes=entry.scopes,
            key_id=client.id,
        )

    def issue_token(self, client_id: str, client_secret: str, scope: str | None) -> tuple[str, _Token]:
        """Client credentials grant: a token for ``client_id`` (narrowed to ``scope``).

        Raises:
            ApiError: 401 for bad credentials, 400 for a scope the client does not hold.
        """
        parsed = c.parse_api_key(client_secret)
        secret = client_secret
        if parsed is not None:
            if parsed[0] != "oauth_client" or parsed[1] != client_id:
                raise ApiError(401, "invalid client credentials")
            secret = parsed[2]
        client = _key_by_prefix(self.tailnet.state, client_id, "oauth_client")
        if not _secret_matches(client, secret) or client is None:
            raise ApiError(401, "invalid client credentials")
        now = self.now()
        if client.usable_at(now) is not None:
            raise ApiError(401, "invalid client credentials: the client was expired")
        scopes = client.scopes
        if scope:
            wanted = tuple(sorted(set(scope.split())))
            for s in wanted:
                if not c.scope_grants(client.scopes, s):
                    raise ApiError(400, f"the client does not hold the scope {s!r}")
            scopes = wanted
        for digest in [d for d, t in self._tokens.items() if t.expires <= now]:
            del self._tokens[digest]
        token = TOKEN_PREFIX + secrets.token_hex(24)
        entry = _Token(client_id=client.id, client_prefix=client.prefix, scopes=scopes, expires=now + TOKEN_LIFETIME)
        self._tokens[hashlib.sha256(token.encode()).hexdigest()] = entry
        return token, entry

    # -- routing ---------------------------------------------------------------------------

    def add(self, route: Route) -> None:
        self.routes.append(route)

    def mount(self, app: QuartTrio) -> None:
        """Register every route on ``app``."""
        for route in self.routes:
            rule = route.path.replace("{", "<").replace("}", ">")
            app.add_url_rule(
                rule,
                endpoint=f"api_{route.operation_id}",
                view_func=self._view(route),
                methods=[route.method],
            )

        async def not_found(rest: str) -> Response:
            return problem_response(404, f"no such API endpoint: {request.method} {request.path}")

        for prefix in ("/api/v1", "/api/v2"):
            app.add_url_rule(
                f"{prefix}/<path:rest>",
                endpoint=f"api_unknown_{prefix[-2:]}",
                view_func=not_found,
                methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            )

    def _view(self, route: Route) -> Callable[..., Awaitable[Response]]:
        async def view(**params: str) -> Response:
            started = time.perf_counter()
            try:
                response = await self._handle(route, params)
            except ApiError as exc:
                response = problem_response(exc.status, exc.detail, exc.title)
            except Exception:
                log.exception("API %s %s failed", route.method, route.path)
                response = problem_response(500, "internal error; see the server log")
            self.stats.record(route.path, route.method, response.status_code, time.perf_counter() - started)
            return response

        return view

    async def _handle(self, route: Route, params: Mapping[str, str]) -> Response:
        if route.auth:
            principal = self.authenticate(request.headers.get("Authorization"), allow_tokens=route.api == "v2")
            if route.scope is not None and principal.scopes is not None and not any(
                c.scope_grants(principal.scopes, s) for s in (route.scope, *route.also_scopes)
            ):
                raise ApiError(403, f"this token lacks the scope {route.scope!r}")
        else:
            principal = Principal(actor=Actor(kind=ActorKind.SYSTEM, id="anonymous"), role="member", user_id=None)
        length = request.content_length
        if length is not None and length > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        body = await request.get_data(cache=True, as_text=False) if route.method in ("POST", "PUT", "PATCH") else b""
        assert isinstance(body, bytes)
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        try:
            reason = check_reason(request.headers.get(REASON_HEADER, ""))
        except ValueError as exc:
            raise ApiError(400, f"{REASON_HEADER}: {exc}") from None
        ctx = Ctx(self, principal, params, body, route)
        # One request, one cause: every event it appends shares a correlation id (and
        # the reason, if it gave one), as an admin-socket command's do.
        with caused_by(reason=reason):
            result = await route.handler(ctx)
        if isinstance(result, Response):
            return result
        if isinstance(result, NodeList):
            response = await self._node_list_response(result, route)
        else:
            payload = result.encode() if isinstance(result, str) else _encoder.encode(result)
            response = Response(payload, status=route.status, content_type=route.content_type)
        for name, value in ctx.headers.items():
            response.headers[name] = value
        return response


    async def _node_list_response(self, kept: NodeList, route: Route) -> Response:
        """A kept node list as this request wants it: 304 if it has it already,
        gzip if it accepts gzip, the JSON otherwise (see "Node lists")."""
        gzipped = accepts_gzip(request.headers.get("Accept-Encoding"))
        etag = kept.gzip_etag if gzipped else kept.etag
        wanted = request.headers.get("If-None-Match")
        if wanted is not None and etag_matches(wanted, kept.etag, kept.gzip_etag):
            response = Response(b"", status=304)
            # A 304 has no body; its headers describe the kept representation, so
            # no Content-Length of 0 (a cache would take it for the list's).
            del response.headers["Content-Length"]
            del response.headers["Content-Type"]
        else:
            body = await kept.gzipped() if gzipped else kept.body
            response = Response(body, status=route.status, content_type=route.content_type)
            if gzipped:
                response.headers["Content-Encoding"] = "gzip"
            sent = self.stats.node_list_bytes
            encoding = "gzip" if gzipped else "identity"
            sent[encoding] = sent.get(encoding, 0) + len(body)
        response.headers["ETag"] = etag
        response.headers["Vary"] = "Accept-Encoding"
        return response


def _credential(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        import base64
        import binascii

        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, _, _password = decoded.partition(":")
        return user or None
    return None


def _acting_for_owner(state: TailnetState, key: ApiKey, gone: str) -> tuple[str, str]:
    """The effective role and the actor id of an API key or OAuth client: one that
    belongs to a user acts as ``<prefix>/<user id>``, and as a member unless its user
    is an admin.

    Raises:
        ApiError: 401 with ``gone`` when its user no longer exists.
    """
    if key.user_id is None:
        return key.role, key.prefix
    user = state.users.get(key.user_id)
    if user is None:
        raise ApiError(401, gone)
    return (key.role if user.is_admin else "member"), f"{key.prefix}/{user.id}"


def _key_by_prefix(state: TailnetState, prefix: str, kind: str) -> ApiKey | None:
    for key in state.api_keys.values():
        if key.prefix == prefix and key.kind == kind:
            return key
    return None


#: Compared against when the prefix is unknown, so that answering takes as long.
_NO_KEY_HASH: Final = "0" * 64


def _secret_matches(key: ApiKey | None, secret: str) -> bool:
    """Constant-time comparison of the secret's hash with the stored one."""
    expected = key.secret_sha256 if key is not None else _NO_KEY_HASH
    return hmac.compare_digest(c.hash_secret(secret).encode(), expected.encode()) and key is not None


def package_version() -> str:
    """The installed package's version (see :func:`cli.version.package_version`)."""
    from ..version import package_version as version

    return version()
