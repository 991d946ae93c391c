"""A deterministic synthetic text-to-SQL dataset in sql-create-context's exact format: the no-network default.

Rows look like the real ones: `context` holds the CREATE TABLE statement(s) the query needs, joined by "; ",
with INTEGER / VARCHAR columns; `answer` is one SQLite query with double-quoted strings and no semicolon.
Templates cover SELECT, WHERE, COUNT, MIN, MAX, AVG, SUM, ORDER BY, GROUP BY and JOIN.
"""

from __future__ import annotations

import random

# table -> (text columns with sample values, number columns with (unit word, low, high))
DOMAINS = {
    "employees": ({"name": ["alice", "bob", "carol", "dan", "erin"], "department": ["sales", "it", "hr", "legal"],
                   "city": ["paris", "lyon", "oslo", "rome"]},
                  {"salary": ("salary", 30000, 90000), "age": ("age", 20, 65)}),
    "songs": ({"title": ["blue", "river", "echo", "dawn"], "artist": ["nova", "kite", "orbit", "vega"],
               "genre": ["rock", "jazz", "pop", "folk"]},
              {"plays": ("plays", 10, 5000), "year": ("year", 1960, 2024)}),
    "cities": ({"city_name": ["oslo", "lima", "kyoto", "accra"], "country": ["norway", "peru", "japan", "ghana"],
                "region": ["north", "south", "east", "west"]},
               {"population": ("population", 1000, 900000), "area": ("area", 10, 900)}),
    "players": ({"player": ["lee", "kim", "ross", "diaz"], "team": ["hawks", "bulls", "suns", "jets"],
                 "position": ["guard", "forward", "center"]},
                {"points": ("points", 0, 60), "games": ("games", 1, 82)}),
}
# Tables that JOIN on a shared text column: (left, right, key column, right-side columns).
JOINS = [
    ("employees", "offices", "city", {"building": ["north hall", "annex", "tower"]}, {"floors": ("floors", 1, 40)}),
    ("players", "teams", "team", {"coach": ["ortiz", "baker", "chen"]}, {"wins": ("wins", 0, 82)}),
]


def create_table(name: str, columns: list[tuple[str, str]]) -> str:
    return f"CREATE TABLE {name} ({', '.join(f'{c} {t}' for c, t in columns)})"


def _row(question: str, tables: list[str], answer: str) -> dict[str, str]:
    return {"question": question, "context": "; ".join(tables), "answer": answer}


def _single_table_row(rng: random.Random) -> dict[str, str]:
    table = rng.choice(sorted(DOMAINS))
    texts, numbers = DOMAINS[table]
    text_col, filter_col = rng.sample(sorted(texts), 2)
    num_col = rng.choice(sorted(numbers))
    word, low, high = numbers[num_col]
    value = rng.choice(texts[filter_col])
    number = rng.randint(low, high)
    kind = rng.randrange(9)
    if kind == 0:
        cols = [(text_col, "VARCHAR"), (filter_col, "VARCHAR")]
        q, a = f"What is the {text_col.replace('_', ' ')} when the {filter_col.replace('_', ' ')} is {value}?", \
            f'SELECT {text_col} FROM {table} WHERE {filter_col} = "{value}"'
    elif kind == 1:
        cols = [(filter_col, "VARCHAR"), (num_col, "INTEGER")]
        q, a = f"How many {table} have {filter_col.replace('_', ' ')} {value} and a {word} below {number}?", \
            f'SELECT COUNT(*) FROM {table} WHERE {filter_col} = "{value}" AND {num_col} < {number}'
    elif kind in (2, 3, 4, 5):
        func, phrase = [("MIN", "lowest"), ("MAX", "highest"), ("AVG", "average"), ("SUM", "total")][kind - 2]
        other = rng.choice([c for c in sorted(numbers) if c != num_col] or [num_col])
        other_word, other_low, other_high = numbers[other]
        bound = rng.randint(other_low, other_high)
        cols = [(num_col, "INTEGER"), (filter_col, "VARCHAR"), (other, "INTEGER")]
        q, a = f"What is the {phrase} {word} of {table} whose {filter_col.replace('_', ' ')} is {value} " \
            f"and {other_word} is at least {bound}?", \
            f'SELECT {func}({num_col}) FROM {table} WHERE {filter_col} = "{value}" AND {other} >= {bound}'
    elif kind == 6:
        cols = [(text_col, "VARCHAR"), (num_col, "INTEGER")]
        direction, phrase = rng.choice([("DESC", "highest"), ("ASC", "lowest")])
        limit = rng.randint(1, 5)
        q, a = f"List the {text_col.replace('_', ' ')} of the {limit} {table} with the {phrase} {word}.", \
            f"SELECT {text_col} FROM {table} ORDER BY {num_col} {direction} LIMIT {limit}"
    elif kind == 7:
        cols = [(filter_col, "VARCHAR"), (num_col, "INTEGER")]
        q, a = f"How many {table} with a {word} over {number} are there for each {filter_col.replace('_', ' ')}?", \
            f"SELECT {filter_col}, COUNT(*) FROM {table} WHERE {num_col} > {number} GROUP BY {filter_col}"
    else:
        cols = [(text_col, "VARCHAR"), (num_col, "INTEGER")]
        q, a = f"Which {text_col.replace('_', ' ')} has a {word} greater than {number}?", \
            f"SELECT {text_col} FROM {table} WHERE {num_col} > {number}"
    return _row(q, [create_table(table, cols)], a)


def _join_row(rng: random.Random) -> dict[str, str]:
    left, right, key, right_texts, right_numbers = rng.choice(JOINS)
    left_texts, _ = DOMAINS[left]
    show = rng.choice([c for c in sorted(left_texts) if c != key])
    right_col = rng.choice(sorted(right_texts))
    value = rng.choice(right_texts[right_col])
    num_col = rng.choice(sorted(right_numbers))
    word, low, high = right_numbers[num_col]
    tables = [create_table(left, [(show, "VARCHAR"), (key, "VARCHAR")]),
              create_table(right, [(key, "VARCHAR"), (right_col, "VARCHAR"), (num_col, "INTEGER")])]
    if rng.random() < 0.5:
        q = f"What is the {show} of {left} whose {right} has {right_col} {value}?"
        a = f'SELECT T1.{show} FROM {left} AS T1 JOIN {right} AS T2 ON T1.{key} = T2.{key} WHERE T2.{right_col} = "{value}"'
    else:
        number = rng.randint(low, high)
        q = f"How many {left} belong to {right} with more than {number} {word}?"
        a = f"SELECT COUNT(*) FROM {left} AS T1 JOIN {right} AS T2 ON T1.{key} = T2.{key} WHERE T2.{num_col} > {number}"
    return _row(q, tables, a)


def synthetic_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n rows (a few may repeat a question: prep's dedupe and leak-free split handle that, as with real data)."""
    rng = random.Random(seed)
    return [_join_row(rng) if rng.random() < 0.15 else _single_table_row(rng) for _ in range(n)]
