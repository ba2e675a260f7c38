#!/usr/bin/env python3
"""Writes examples/shop.singer: a small, deterministic tap output for trying singer-ingest.

Three streams (customers keyed by id, orders keyed by order_id with updates of earlier orders,
page_views without keys), nested objects, arrays, date-times and dates, money with multipleOf 0.01,
a mid-run SCHEMA change (customers gain `loyalty_tier`) and a STATE every 100 records.

    python examples/make_shop.py > examples/shop.singer
"""
import json
import random
import sys
from datetime import date, datetime, timedelta, timezone

rng = random.Random(42)
T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)

CUSTOMERS = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": ["null", "string"]},
        "email": {"type": ["null", "string"]},
        "birthday": {"type": ["null", "string"], "format": "date"},
        "address": {"type": ["null", "object"], "properties": {
            "city": {"type": ["null", "string"]}, "country": {"type": ["null", "string"]}}},
        "tags": {"type": ["null", "array"], "items": {"type": "string"}},
        "signed_up_at": {"type": "string", "format": "date-time"},
    },
    "required": ["id", "signed_up_at"],
}
ORDERS = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer"},
        "customer_id": {"type": "integer"},
        "status": {"type": "string", "enum": ["new", "paid", "shipped", "cancelled"]},
        "total": {"type": "number", "multipleOf": 0.01},
        "lines": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer"}, "price": {"type": "number"}}}},
        "ordered_at": {"type": "string", "format": "date-time"},
    },
    "required": ["order_id", "customer_id", "status", "total"],
}
PAGE_VIEWS = {
    "type": "object",
    "properties": {
        "customer_id": {"type": ["null", "integer"]},
        "path": {"type": "string"},
        "seconds_on_page": {"type": ["null", "number"]},
        "viewed_at": {"type": "string", "format": "date-time"},
    },
    "required": ["path", "viewed_at"],
}
CITIES = [("Lisbon", "PT"), ("Nairobi", "KE"), ("Montréal", "CA"), ("Kyoto", "JP"), ("Córdoba", "AR")]


def emit(msg):
    sys.stdout.write(json.dumps(msg, separators=(",", ":"), ensure_ascii=False) + "\n")


def ts(minutes):
    return (T0 + timedelta(minutes=minutes)).isoformat()


def main():
    emit({"type": "SCHEMA", "stream": "customers", "schema": CUSTOMERS, "key_properties": ["id"]})
    emit({"type": "SCHEMA", "stream": "orders", "schema": ORDERS, "key_properties": ["order_id"],
          "bookmark_properties": ["ordered_at"]})
    emit({"type": "SCHEMA", "stream": "page_views", "schema": PAGE_VIEWS, "key_properties": []})
    counts = {"customers": 0, "orders": 0, "page_views": 0}
    customers_schema = CUSTOMERS
    for i in range(1, 401):
        if i == 200:
            customers_schema = json.loads(json.dumps(CUSTOMERS))
            customers_schema["properties"]["loyalty_tier"] = {"type": ["null", "string"]}
            emit({"type": "SCHEMA", "stream": "customers", "schema": customers_schema, "key_properties": ["id"]})
        kind = ("customers", "orders", "orders", "page_views", "page_views")[i % 5]
        counts[kind] += 1
        n = counts[kind]
        if kind == "customers":
            city, country = rng.choice(CITIES)
            rec = {"id": n, "name": f"Customer {n}", "email": f"c{n}@example.com",
                   "birthday": (date(1970, 1, 1) + timedelta(days=rng.randrange(15000))).isoformat(),
                   "address": {"city": city, "country": country},
                   "tags": rng.sample(["vip", "newsletter", "b2b", "returning"], rng.randrange(3)),
                   "signed_up_at": ts(i)}
            if "loyalty_tier" in customers_schema["properties"]:
                rec["loyalty_tier"] = rng.choice(["bronze", "silver", "gold", None])
        elif kind == "orders":
            order_id = rng.randrange(1, n) if n > 5 and rng.random() < 0.25 else n
            lines = [{"sku": f"SKU-{rng.randrange(100):03d}", "qty": rng.randrange(1, 4),
                      "price": rng.choice([4.99, 9.99, 19.99, 0.07, 120.5])} for _ in range(rng.randrange(1, 4))]
            rec = {"order_id": order_id, "customer_id": rng.randrange(1, 80),
                   "status": rng.choice(["new", "paid", "shipped", "cancelled"]),
                   "total": round(sum(line["qty"] * line["price"] for line in lines), 2), "lines": lines,
                   "ordered_at": ts(i)}
        else:
            rec = {"customer_id": rng.choice([None, rng.randrange(1, 80)]),
                   "path": rng.choice(["/", "/cart", "/products/42", "/checkout"]),
                   "seconds_on_page": round(rng.uniform(0.5, 300), 1), "viewed_at": ts(i)}
        emit({"type": "RECORD", "stream": kind, "record": rec, "time_extracted": ts(i)})
        if i % 100 == 0:
            emit({"type": "STATE", "value": {"bookmarks": {
                "customers": {"id": counts["customers"]}, "orders": {"ordered_at": ts(i)},
                "page_views": {"viewed_at": ts(i)}}}})


if __name__ == "__main__":
    main()
