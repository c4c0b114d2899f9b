"""A small web shop on loopback, so the example scraper does real HTTP without the internet.

The catalogue is generated from a seed: a few hundred product pages in a handful of
categories, listed 12 to a page with a ``rel="next"`` link. Some pages misbehave on purpose,
the way real sites do:

- some product pages are slow (but answer within the scraper's timeout);
- ``outdoor``: listing page 2 answers 500 the first time it is asked for, then works;
- ``electronics``: one product page hangs past any sane timeout the first time, then works;
- ``clearance``: listing page 3 always answers 500;
- ``vintage``: one product page is malformed (cut off before its price).

So a scrape of the whole shop shows retries that recover and batches that fail for good.
``POST /webhooks/catalog`` accepts JSON notifications (what the export handler sends) and
``GET /webhooks/catalog`` lists the ones received.

Used in-process by ``manage.py demo`` and the tests (:class:`DemoShop`), or on its own:
``python demo_shop.py --port 8001``. It only ever binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from html import escape
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

HOST = "127.0.0.1"
PAGE_SIZE = 12

# slug -> (title, sku prefix, product count, nouns)
CATEGORIES: dict[str, tuple[str, str, int, tuple[str, ...]]] = {
    "kitchen": (
        "Kitchen",
        "KIT",
        48,
        ("Knife", "Pan", "Pepper Mill", "Whisk", "Salt & Pepper Set"),
    ),
    "garden": ("Garden", "GAR", 40, ("Watering Can", "Shears", "Seed Tray", "Trowel", "Hose")),
    "office": ("Office", "OFF", 36, ("Desk Lamp", "Stapler", "Notebook", "Pen Set", "Chair")),
    "toys": ("Toys", "TOY", 44, ("Kite", "Puzzle", "Yo-yo", "Robot", "Train Set")),
    "books": ("Books", "BOO", 52, ("Atlas", "Cookbook", "Novel", "Field Guide", "Almanac")),
    "outdoor": ("Outdoor", "OUT", 40, ("Tent", "Lantern", "Backpack", "Hammock", "Stove")),
    "electronics": ("Electronics", "ELE", 38, ("Radio", "Charger", "Speaker", "Cable", "Clock")),
    "clearance": ("Clearance", "CLR", 30, ("Mug", "Candle", "Frame", "Vase", "Basket")),
    "vintage": ("Vintage", "VIN", 24, ("Typewriter", "Camera", "Gramophone", "Globe", "Clock")),
}
ADJECTIVES = ("Classic", "Compact", "Deluxe", "Handmade", "Sturdy", "Tiny", "Bright", "Smart")

FLAKY_LISTING = ("outdoor", 2)  # 500 the first time, then fine
BROKEN_LISTING = ("clearance", 3)  # always 500
HANGING_PRODUCT = "ELE-0007"  # hangs the first time, then fine
MALFORMED_PRODUCT = "VIN-0011"  # no price, ever
SLOW_EVERY = 7  # every 7th product page is slow

FAULTS = {
    "outdoor": "listing page 2 answers 500 once (the retry recovers)",
    "electronics": f"product {HANGING_PRODUCT} hangs once (a timeout; the retry recovers)",
    "clearance": "listing page 3 always answers 500 (the batch fails)",
    "vintage": f"product {MALFORMED_PRODUCT} is malformed (the batch fails)",
}
"""What goes wrong in which category, for people reading the demo's output."""


@dataclass(frozen=True)
class ShopProduct:
    sku: str
    name: str
    category: str
    price: Decimal
    in_stock: bool
    slow: bool


def generate_catalogue(seed: int) -> dict[str, list[ShopProduct]]:
    """The shop's products per category slug; the same seed gives the same catalogue."""
    rng = random.Random(seed)  # noqa: S311 - sample data, not secrets
    catalogue: dict[str, list[ShopProduct]] = {}
    number = 0
    for slug, (_title, prefix, count, nouns) in CATEGORIES.items():
        products = []
        for index in range(1, count + 1):
            number += 1
            products.append(
                ShopProduct(
                    sku=f"{prefix}-{index:04d}",
                    name=f"{rng.choice(ADJECTIVES)} {rng.choice(nouns)}",
                    category=slug,
                    price=Decimal(rng.randint(199, 19_999)) / 100,
                    in_stock=rng.random() > 0.15,
                    slow=number % SLOW_EVERY == 0,
                )
            )
        catalogue[slug] = products
    return catalogue


@dataclass
class DemoShop:
    """The shop's catalogue, its faults and the server thread; a context manager.

    ``slow_seconds`` is how long slow pages take, ``hang_seconds`` how long the hanging page
    hangs (more than the scraper's timeout). ``port=0`` picks a free port.
    """

    seed: int = 42
    port: int = 0
    slow_seconds: float = 0.2
    hang_seconds: float = 10.0
    catalogue: dict[str, list[ShopProduct]] = field(init=False)
    products: dict[str, ShopProduct] = field(init=False)
    hits: Counter[str] = field(init=False, default_factory=Counter)
    webhooks: list[Any] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.catalogue = generate_catalogue(self.seed)
        self.products = {p.sku: p for items in self.catalogue.values() for p in items}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- running --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The shop's base URL, without a trailing slash."""
        assert self._server is not None, "the shop is not running"
        return f"http://{HOST}:{self._server.server_address[1]}"

    def category_url(self, slug: str) -> str:
        return f"{self.url}/c/{slug}/"

    @property
    def webhook_url(self) -> str:
        return f"{self.url}/webhooks/catalog"

    def start(self) -> DemoShop:
        self._stopping.clear()
        self._server = _Server((HOST, self.port), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="demo-shop",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut hanging responses short and close every connection."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()  # joins the request threads
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None

    def __enter__(self) -> DemoShop:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- state ----------------------------------------------------------------------------

    def hit(self, key: str) -> int:
        """Count a request for ``key``; the number of requests so far, this one included."""
        with self._lock:
            self.hits[key] += 1
            return self.hits[key]

    def received(self, payload: Any) -> None:
        with self._lock:
            self.webhooks.append(payload)

    def pause(self, seconds: float) -> None:
        """Sleep like a slow server, but end at once when the shop stops."""
        self._stopping.wait(seconds)

    def page_count(self, slug: str) -> int:
        return -(-len(self.catalogue[slug]) // PAGE_SIZE)


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() waits for the request threads

    def __init__(self, address: tuple[str, int], handler: type[_Handler], shop: DemoShop) -> None:
        self.shop = shop
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake request threads blocked reading idle keep-alive connections."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so a scraper's session reuses connections
    server_version = "DemoShop/1.0"
    timeout = 30  # idle keep-alive connections are closed after this
    disable_nagle_algorithm = True  # headers and body go out as two writes: don't delay the body
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the demo prints its own progress

    @property
    def shop(self) -> DemoShop:
        return self.server.shop

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        segments = [s for s in parts.path.split("/") if s]
        if not segments:
            self._index()
        elif len(segments) == 2 and segments[0] == "c" and segments[1] in CATEGORIES:
            page = parse_qs(parts.query).get("page", ["1"])[0]
            self._listing(segments[1], int(page) if page.isdigit() else 0)
        elif len(segments) == 2 and segments[0] == "p":
            self._product(segments[1])
        elif segments == ["webhooks", "catalog"]:
            with self.shop._lock:
                body = json.dumps(self.shop.webhooks)
            self._send(HTTPStatus.OK, body, "application/json")
        else:
            self._send(HTTPStatus.NOT_FOUND, _page("Not found", "<p>No such page.</p>"))

    def do_POST(self) -> None:
        if urlsplit(self.path).path.rstrip("/") != "/webhooks/catalog":
            self._send(HTTPStatus.NOT_FOUND, _page("Not found", "<p>No such page.</p>"))
            return
        length = int(self.headers.get("Content-Length") or 0)
        try:
            payload = json.loads(self.rfile.read(length))
        except ValueError:
            self._send(HTTPStatus.BAD_REQUEST, '{"error": "invalid JSON"}', "application/json")
            return
        self.shop.received(payload)
        self._send(HTTPStatus.NO_CONTENT, "")

    def _index(self) -> None:
        links = "".join(
            f'<li><a href="/c/{slug}/">{escape(title)}</a></li>'
            for slug, (title, *_rest) in CATEGORIES.items()
        )
        self._send(HTTPStatus.OK, _page("Demo shop", f'<ul class="categories">{links}</ul>'))

    def _listing(self, slug: str, page: int) -> None:
        shop = self.shop
        pages = shop.page_count(slug)
        if not 1 <= page <= pages:
            self._send(HTTPStatus.NOT_FOUND, _page("Not found", "<p>No such page.</p>"))
            return
        hits = shop.hit(f"/c/{slug}/?page={page}")
        if (slug, page) == BROKEN_LISTING or ((slug, page) == FLAKY_LISTING and hits == 1):
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, _page("Server error", "<p>Oops.</p>"))
            return
        items = shop.catalogue[slug][(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        cards = "".join(
            f'<li class="product"><a href="/p/{p.sku}">{escape(p.name)}</a></li>' for p in items
        )
        nav = f'<a rel="next" href="?page={page + 1}">Next</a>' if page < pages else ""
        title = CATEGORIES[slug][0]
        self._send(
            HTTPStatus.OK,
            _page(f"{title}, page {page}", f'<ul class="products">{cards}</ul><nav>{nav}</nav>'),
        )

    def _product(self, sku: str) -> None:
        shop = self.shop
        product = shop.products.get(sku)
        if product is None:
            self._send(HTTPStatus.NOT_FOUND, _page("Not found", "<p>No such product.</p>"))
            return
        hits = shop.hit(f"/p/{sku}")
        if sku == HANGING_PRODUCT and hits == 1:
            shop.pause(shop.hang_seconds)
        elif product.slow:
            shop.pause(shop.slow_seconds)
        if sku == MALFORMED_PRODUCT:
            # Cut off mid-tag, before the price: what a crashed template or a proxy leaves.
            body = f'<html><body><h1 class="product-name">{escape(product.name)}</h1><div class="'
            self._send(HTTPStatus.OK, body)
            return
        stock = "In stock" if product.in_stock else "Sold out"
        self._send(
            HTTPStatus.OK,
            _page(
                product.name,
                f'<article class="product" data-category="{product.category}">'
                f'<h1 class="product-name">{escape(product.name)}</h1>'
                f'<p>SKU <span class="sku">{product.sku}</span></p>'
                f'<p class="price" data-currency="EUR">{product.price}</p>'
                f'<p class="stock">{stock}</p></article>',
            ),
        )

    def _send(self, status: HTTPStatus, body: str, content_type: str = "text/html") -> None:
        data = body.encode()
        try:
            self.send_response(status)
            if status != HTTPStatus.NO_CONTENT:
                self.send_header("Content-Type", f"{content_type}; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client gave up (a timeout) or the shop stops


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{escape(title)}</title></head>"
        f"<body><h2>{escape(title)}</h2>{body}</body></html>"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the demo shop on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    shop = DemoShop(seed=args.seed, port=args.port).start()
    print(f"Demo shop at {shop.url}/ ({len(shop.products)} products); Ctrl-C stops it.")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        shop.stop()


if __name__ == "__main__":
    main()
