#!/usr/bin/env python3
"""Writes kafka/orders.sample.jsonl: 1,000 deterministic, realistic `orders` events
(the schema is kafka/orders.schema.json). Order ids repeat with new statuses, as an order's
life cycle would on the topic. Usage: python3 kafka/generate_orders.py > kafka/orders.sample.jsonl

`generate(seed, count)` returns the events as dicts: scripts/quantize_model.py calibrates on
one seed and checks the int8 model on the sample's own."""
import json
import random
from datetime import datetime, timedelta, timezone

PRODUCTS = [
    ("LMP-0042", "Brass desk lamp", 59.00), ("RUG-1180", "Wool rug 160x230", 249.00),
    ("MUG-0007", "Stoneware mug", 12.50), ("CHR-0310", "Oak dining chair", 139.00),
    ("PLT-0021", "Monstera plant, 80 cm", 45.90), ("CUR-0555", "Linen curtains (pair)", 89.00),
    ("KTL-0800", "Electric kettle 1.7 l", 39.99), ("PIL-0104", "Feather pillow", 29.00),
    ("SHF-0212", "Wall shelf, walnut", 74.00), ("CND-0033", "Soy candle, cedar", 18.00),
    ("TWL-0460", "Cotton bath towel", 16.50), ("FRM-0090", "Picture frame A3", 22.00),
]
FIRST = ["Ana", "Ben", "Chloé", "Dmitri", "Elif", "Farah", "Gustav", "Hana", "Ivo", "Jun", "Kofi",
         "Lena", "Mateo", "Nora", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tariq", "Uma", "Yara"]
LAST = ["Almeida", "Berger", "Costa", "Dubois", "Eriksen", "Fischer", "García", "Haddad", "Ito",
        "Jansen", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Rossi", "Schmidt"]
NOTES = [
    "Please leave the parcel with the neighbour at number {n} if nobody answers.",
    "Gift for my mother, please remove the price tags.",
    "The lamp arrived with a cracked shade, please send a replacement.",
    "Can you deliver after 5pm? I work from the office until then.",
    "Ring twice, the doorbell is broken.",
    "Changed my mind about the colour, is it possible to swap for the dark version?",
    "Urgent: needed before the weekend for a dinner party.",
    "Second order this month, the chairs were great quality.",
    "Customer called support: wants to combine this with order {other}.",
    "Package was left in the rain last time, please use the side door.",
    "Refund requested, the rug is smaller than described.",
    "Please do not use plastic packaging.",
    None, None, None,
]
COUNTRIES = ["DE", "FR", "NL", "ES", "IT", "SE", "PL", "GB", "US", "PT"]
CURRENCY = {"GB": "GBP", "US": "USD"}
NEXT = {"pending": ["paid", "cancelled"], "paid": ["shipped", "refunded"], "shipped": ["delivered"],
        "delivered": ["refunded"], "cancelled": [], "refunded": []}

SEED = 20261123


def generate(seed=SEED, count=1000):
    """`count` order events (dicts), deterministic for a seed."""
    rng = random.Random(seed)
    start = datetime(2026, 11, 1, 8, 0, tzinfo=timezone.utc)
    orders = {}
    clock = start
    lines = []
    next_id = 1
    while len(lines) < count:
        clock += timedelta(seconds=rng.randint(20, 900))
        live = [o for o in orders.values() if NEXT[o["status"]]]
        if live and rng.random() < 0.35:
            o = dict(rng.choice(live))
            o["status"] = rng.choice(NEXT[o["status"]])
            o["updated_at"] = clock.isoformat().replace("+00:00", "Z")
        else:
            cust = rng.randint(1, 400)
            country = rng.choice(COUNTRIES)
            items = []
            for sku, name, price in rng.sample(PRODUCTS, rng.randint(1, 4)):
                items.append({"sku": sku, "name": name, "qty": rng.randint(1, 3), "unit_price": price})
            subtotal = round(sum(i["qty"] * i["unit_price"] for i in items), 2)
            shipping = 0.0 if subtotal >= 100 else 4.95
            note = rng.choice(NOTES)
            if note:
                note = note.format(n=rng.randint(1, 120), other=f"ord-{rng.randint(1, max(1, next_id)):08d}")
            ts = clock.isoformat().replace("+00:00", "Z")
            o = {
                "order_id": f"ord-{next_id:08d}",
                "customer_id": f"cust-{cust:05d}",
                "customer_name": f"{FIRST[cust % len(FIRST)]} {LAST[cust % len(LAST)]}",
                "status": "pending",
                "currency": CURRENCY.get(country, "EUR"),
                "items": items,
                "subtotal": subtotal,
                "shipping": shipping,
                "total": round(subtotal + shipping, 2),
                "shipping_country": country,
                "created_at": ts,
                "updated_at": ts,
                "note": note,
            }
            next_id += 1
        orders[o["order_id"]] = o
        lines.append(o)
    return lines


if __name__ == "__main__":
    print("\n".join(json.dumps(o, ensure_ascii=False, separators=(",", ":")) for o in generate()))
