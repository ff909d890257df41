"""The one HTTP transport shared by every HTTP power type (webhook, dli, openbmc, rsd,
msftocs, ucsm, amt, nova, sm15k...).

A driver builds one :class:`HttpClient` per instance (one ``requests`` session: one
keep-alive connection pool, one cookie jar) and closes it in ``close()``. The client:

- puts ``timeout`` on every call (connect and read), never retries (retrying and backoff
  live in ``workers/policy.py``), never reads proxies or ``.netrc`` from the environment;
- verifies TLS certificates unless told not to (``verify_ssl=False``) and accepts a CA
  bundle path;
- authenticates with HTTP basic, digest, or "auto" (basic, switching once to digest when
  the device challenges with ``Digest``), or a bearer token (:func:`bearer_headers`);
- maps HTTP status codes and ``requests`` errors into :mod:`drivers.errors` (see
  :func:`error_for_status` and :func:`translate`), with every secret it was given
  scrubbed from the message;
- parses JSON (:func:`parse_json`) and XML (:func:`parse_xml`, with ``defusedxml`` when
  installed) replies, turning malformed bodies into :class:`DeviceError`.

``requests`` is imported only when a client is built, so the registry imports on a host
without it (:class:`ToolMissingError` then).

Status mapping::

    401, 403                 -> AuthError        auth_failed
    404                      -> NotFoundError    not_found
    409, 423, 429, 503       -> BusyError        busy
    504                      -> CallTimeoutError timeout
    other 4xx, 5xx           -> DeviceError      device_error
    connection refused / reset, no route, connect timeout -> UnreachableError unreachable
    read timeout             -> CallTimeoutError timeout
    TLS handshake / certificate failure -> DeviceError device_error
"""

from __future__ import annotations

import json as _json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urljoin, urlsplit
from xml.etree.ElementTree import Element

from .errors import (
    AuthError,
    BusyError,
    CallTimeoutError,
    DeviceError,
    NotFoundError,
    PowerError,
    ToolMissingError,
    UnreachableError,
)

if TYPE_CHECKING:  # pragma: no cover
    import requests

AuthScheme = Literal["basic", "digest", "auto"]

BUSY_STATUSES: frozenset[int] = frozenset({409, 423, 429, 503})
"""HTTP statuses that mean "try again later"."""
AUTH_STATUSES: frozenset[int] = frozenset({401, 403})

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class HttpAuth:
    """User and password for HTTP authentication.

    ``scheme``: ``basic``, ``digest``, or ``auto`` (send basic; if the device answers 401
    with a ``Digest`` challenge, switch to digest for this and later calls).
    ``repr`` never shows the password.
    """

    user: str
    password: str
    scheme: AuthScheme = "basic"

    def __repr__(self) -> str:
        return f"HttpAuth(user={self.user!r}, scheme={self.scheme!r})"


def bearer_headers(token: str) -> dict[str, str]:
    """The ``Authorization`` header for a bearer token."""
    return {"Authorization": f"Bearer {token}"}


def base_url(
    address: str,
    *,
    default_scheme: str = "https",
    default_port: int | None = None,
    allow_path: bool = False,
) -> tuple[str, str]:
    """Split a ``power_address`` into (base URL, device identity).

    Accepts ``host``, ``host:port``, ``[v6]:port`` or an ``http(s)://`` URL. The scheme
    defaults to ``default_scheme`` and the port to ``default_port`` (else the scheme's).
    The identity spells scheme, host and port out, for ``bmc_key``. With ``allow_path``
    a URL path is kept in the base URL (without a trailing ``/``). Raises ``ValueError``
    (credentials, query or fragment in the address, a bad port, no host).
    """
    text = address.strip()
    if not text:
        raise ValueError("the address is empty")
    if "://" not in text:
        text = f"{default_scheme}://{text}"
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("the address scheme must be http or https")
    if parts.username or parts.password:
        raise ValueError("the address must not carry credentials: use power_user / power_pass")
    if parts.query or parts.fragment:
        raise ValueError("the address must not have a query or fragment")
    path = parts.path.rstrip("/")
    if path and not allow_path:
        raise ValueError("the address must not have a path")
    host = parts.hostname
    if not host or any(c.isspace() for c in host):
        raise ValueError("the address has no valid host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the address has an invalid port") from None
    port = port or default_port
    host_in_url = f"[{host}]" if ":" in host else host
    authority = host_in_url if port is None else f"{host_in_url}:{port}"
    identity = f"{scheme}://{host_in_url}:{port or _DEFAULT_PORTS[scheme]}"
    return f"{scheme}://{authority}{path}", identity


def scrub(text: str, secrets: Iterable[str], limit: int = 200) -> str:
    """``text`` shortened to ``limit`` characters with every (non-empty) secret replaced
    by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text[:limit]


def error_for_status(status: int, where: str, action: str, detail: str = "") -> PowerError:
    """The taxonomy error for an HTTP error status (see the module's table).

    ``detail`` (already scrubbed) is appended to the message when given.
    """
    suffix = f": {detail}" if detail else ""
    if status in AUTH_STATUSES:
        return AuthError(f"{where}: {action} refused the credentials (HTTP {status})", status=status)
    if status == 404:
        return NotFoundError(f"{where}: {action}: not found (HTTP 404){suffix}", status=status)
    if status in BUSY_STATUSES:
        return BusyError(f"{where}: {action}: device busy (HTTP {status}){suffix}", status=status)
    if status == 504:
        return CallTimeoutError(f"{where}: {action}: gateway timeout (HTTP 504)", status=status)
    return DeviceError(f"{where}: {action} failed (HTTP {status}){suffix}", status=status)


def translate(exc: BaseException, where: str, action: str, timeout: float) -> PowerError:
    """The taxonomy error for a ``requests`` (or socket) exception. Never echoes the
    exception's text (it may hold a URL with a token in it)."""
    import requests

    rx = requests.exceptions
    if isinstance(exc, PowerError):
        return exc
    if isinstance(exc, rx.SSLError):
        return DeviceError(f"{where}: TLS handshake failed (certificate not trusted?)")
    if isinstance(exc, rx.ConnectTimeout):
        return UnreachableError(f"{where}: no answer to connect within {timeout:g}s")
    if isinstance(exc, rx.Timeout):
        return CallTimeoutError(f"{where}: {action}: no reply within {timeout:g}s")
    if isinstance(exc, rx.ConnectionError):
        cause = _root_cause(exc)
        if isinstance(cause, TimeoutError):
            return CallTimeoutError(f"{where}: {action}: no reply within {timeout:g}s")
        return UnreachableError(f"{where}: cannot connect ({type(cause).__name__})")
    if isinstance(exc, rx.RequestException):
        return DeviceError(f"{where}: {action} failed ({type(exc).__name__})")
    if isinstance(exc, TimeoutError):
        return CallTimeoutError(f"{where}: {action}: no reply within {timeout:g}s")
    if isinstance(exc, OSError):
        return UnreachableError(f"{where}: cannot connect ({type(exc).__name__})")
    return DeviceError(f"{where}: {action} failed ({type(exc).__name__})")


def _root_cause(exc: BaseException) -> BaseException:
    seen: set[int] = set()
    while True:
        nxt = exc.__cause__ or exc.__context__
        args = getattr(exc, "args", ())
        reason = getattr(exc, "reason", None)
        if isinstance(reason, BaseException):
            nxt = reason
        elif args and isinstance(args[0], BaseException):
            nxt = args[0]
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(exc))
        exc = nxt


def parse_json(body: bytes | str, where: str, action: str = "reply") -> Any:
    """Decode a JSON body. Raises :class:`DeviceError` when it is not JSON."""
    try:
        return _json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise DeviceError(f"{where}: {action}: the device sent malformed JSON") from None


def parse_xml(body: bytes | str, where: str, action: str = "reply") -> Element:
    """Parse an XML body into an Element, with ``defusedxml`` when it is installed (no
    entity expansion, no external entities). Raises :class:`DeviceError` when the body
    is not well-formed (or is refused by defusedxml)."""
    try:
        from defusedxml import ElementTree as safe_et
    except ImportError:  # pragma: no cover - defusedxml is a worker dependency
        safe_et = None
    try:
        if safe_et is not None:
            return safe_et.fromstring(body)  # type: ignore[no-any-return]
        from xml.etree import ElementTree

        return ElementTree.fromstring(body)
    except Exception:  # noqa: BLE001 - ParseError, defusedxml's refusals
        raise DeviceError(f"{where}: {action}: the device sent malformed XML") from None


def local_name(tag: str) -> str:
    """An XML tag without its ``{namespace}``."""
    return tag.rsplit("}", 1)[-1]


def xml_find(elem: Element, name: str) -> Element | None:
    """The first descendant (or ``elem`` itself) whose local name is ``name``, whatever
    its namespace."""
    for child in elem.iter():
        if local_name(child.tag) == name:
            return child
    return None


def xml_text(elem: Element, name: str, default: str | None = None) -> str | None:
    """The stripped text of :func:`xml_find` ``(elem, name)``, or ``default``."""
    found = xml_find(elem, name)
    if found is None:
        return default
    return (found.text or "").strip()


class HttpClient:
    """One ``requests`` session to one device. Not thread-safe: a driver instance makes
    one call at a time. Every method raises only :mod:`drivers.errors` exceptions.

    ``where`` names the device in messages (e.g. ``"dli http://10.0.0.9:80"``);
    ``secrets`` are scrubbed from any device text quoted in a message (the auth password
    is added automatically).
    """

    def __init__(
        self,
        base: str,
        *,
        where: str,
        timeout: float,
        verify_ssl: bool = True,
        ca_bundle: str | None = None,
        auth: HttpAuth | None = None,
        headers: Mapping[str, str] | None = None,
        secrets: Iterable[str] = (),
    ) -> None:
        try:
            import requests
            from requests.adapters import HTTPAdapter
        except ImportError as exc:
            raise ToolMissingError("the requests library is not installed") from exc
        self.base = base.rstrip("/")
        self.where = where
        self.timeout = timeout
        self.auth = auth
        self.secrets = [s for s in secrets if s]
        if auth is not None and auth.password:
            self.secrets.append(auth.password)
        self._digest = auth is not None and auth.scheme == "digest"
        self._auth_obj: Any = None
        session = requests.Session()
        session.trust_env = False  # no proxies, no .netrc credentials from the environment
        session.verify = ca_bundle if (verify_ssl and ca_bundle) else verify_ssl
        adapter = HTTPAdapter(max_retries=0, pool_maxsize=2)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        if headers:
            session.headers.update(headers)
        self.session: requests.Session | None = session
        if not verify_ssl and self.base.startswith("https"):
            quiet_insecure_warnings()

    # -- requests ------------------------------------------------------------------

    def url(self, path: str) -> str:
        """``path`` joined to the base URL; an absolute URL is used as it is."""
        if "://" in path:
            return path
        return urljoin(self.base + "/", path.lstrip("/"))

    def request(
        self,
        method: str,
        path: str,
        *,
        action: str,
        params: Mapping[str, Any] | str | None = None,
        json: Any = None,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        allow: Collection[int] = (),
    ) -> requests.Response:
        """Send one request and return the response.

        A status >= 400 raises :func:`error_for_status` unless it is in ``allow`` (then
        the response is returned for the caller to read). Redirects are followed.
        ``action`` names the operation in messages. Raises the taxonomy errors, never a
        ``requests`` exception.
        """
        session = self.session
        if session is None:
            raise DeviceError(f"{self.where}: the HTTP client is closed")
        kwargs: dict[str, Any] = {
            "params": params, "json": json, "data": data, "headers": dict(headers or {}),
            "timeout": (self.timeout, self.timeout),
        }
        try:
            response = session.request(method, self.url(path), auth=self._auth(), **kwargs)
            if (
                response.status_code == 401
                and self.auth is not None
                and self.auth.scheme == "auto"
                and not self._digest
                and response.headers.get("WWW-Authenticate", "").lower().startswith("digest")
            ):
                self._digest = True
                response = session.request(method, self.url(path), auth=self._auth(), **kwargs)
        except Exception as exc:  # noqa: BLE001 - translated at the edge
            raise translate(exc, self.where, action, self.timeout) from exc
        if response.status_code >= 400 and response.status_code not in allow:
            raise error_for_status(
                response.status_code, self.where, action, self.detail(response)
            )
        return response

    def get(self, path: str, *, action: str, **kwargs: Any) -> requests.Response:
        """:meth:`request` with GET."""
        return self.request("GET", path, action=action, **kwargs)

    def post(self, path: str, *, action: str, **kwargs: Any) -> requests.Response:
        """:meth:`request` with POST."""
        return self.request("POST", path, action=action, **kwargs)

    def json(self, response: requests.Response, action: str = "reply") -> Any:
        """The response body as JSON. Raises :class:`DeviceError`."""
        return parse_json(response.content, self.where, action)

    def xml(self, response: requests.Response, action: str = "reply") -> Element:
        """The response body as XML. Raises :class:`DeviceError`."""
        return parse_xml(response.content, self.where, action)

    def detail(self, response: requests.Response) -> str:
        """A short, scrubbed, one-line excerpt of an error reply's body for messages."""
        try:
            text = response.text
        except Exception:  # noqa: BLE001
            return ""
        text = re.sub(r"<[^>]*>", " ", text)  # tags of an HTML / XML error page
        text = " ".join(text.split())
        return self.scrub(text, limit=120)

    def scrub(self, text: str, limit: int = 200) -> str:
        """``text`` with this client's secrets removed (see :func:`scrub`)."""
        return scrub(text, self.secrets, limit)

    def close(self) -> None:
        """Close the session's connections. Never raises."""
        session, self.session = self.session, None
        if session is not None:
            try:
                session.close()
            except Exception:  # noqa: BLE001 - close never raises
                pass

    # -- helpers -------------------------------------------------------------------

    def _auth(self) -> Any:
        """The requests auth object; one digest object is kept so that its nonce is
        reused (one challenge per session, not one per call)."""
        if self.auth is None:
            return None
        from requests.auth import HTTPBasicAuth, HTTPDigestAuth

        if self._digest:
            if not isinstance(self._auth_obj, HTTPDigestAuth):
                self._auth_obj = HTTPDigestAuth(self.auth.user, self.auth.password)
        elif self._auth_obj is None:
            self._auth_obj = HTTPBasicAuth(self.auth.user, self.auth.password)
        return self._auth_obj


_warnings_quieted = False


def quiet_insecure_warnings() -> None:
    """Verification was switched off on purpose: don't warn on every call."""
    global _warnings_quieted
    if not _warnings_quieted:
        import urllib3

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        _warnings_quieted = True


__all__ = [
    "AUTH_STATUSES",
    "BUSY_STATUSES",
    "HttpAuth",
    "HttpClient",
    "base_url",
    "bearer_headers",
    "error_for_status",
    "local_name",
    "parse_json",
    "parse_xml",
    "scrub",
    "translate",
    "xml_find",
    "xml_text",
]
