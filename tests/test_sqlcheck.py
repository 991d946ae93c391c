import pytest

from jobs.lib.sqlcheck import (Table, comparisons, exact_match, is_sql_only, normalize_sql, parse_schema, parse_statements,
                           single_query)

QUERY = 'SELECT name FROM singer WHERE country = "France"'


@pytest.mark.parametrize("response", [
    QUERY,
    QUERY + ";",
    f"  {QUERY} ;\n",
    "SELECT COUNT(*) FROM singer",
    "SELECT name FROM singer\nWHERE age > 30\nORDER BY age DESC",
    "WITH a AS (SELECT name FROM singer) SELECT name FROM a",
    "SELECT name FROM singer UNION SELECT name FROM band",
])
def test_one_query_is_sql_only(response):
    assert is_sql_only(response)


@pytest.mark.parametrize("response", [
    f"Here is the query: {QUERY}",  # prose before
    f"{QUERY}\nThis returns the names of French singers.",  # prose after
    f"{QUERY}; SELECT age FROM singer",  # two statements
    f"```sql\n{QUERY}\n```",  # a markdown fence
    f"```\n{QUERY}\n```",
    f"To find the answer, you can use: {QUERY}",
    f"Sure! Here is the query:\n\n{QUERY}",
    f"To find the names, use the following SQL query:\n\n```sql\n{QUERY};\n```",
    "The answer is 5.",
    "France",  # a bare word parses as a column name, but it is not a query
    "",
    "DELETE FROM singer",  # SQL, but not a query
])
def test_anything_else_is_not_sql_only(response):
    assert not is_sql_only(response)


def test_a_markdown_fence_is_not_sql_for_any_caller():
    # stated once, in parse_statements: sqlglot's SQLite dialect would read the backticks as quoted names
    assert [s.sql() for s in parse_statements("SELECT 1; SELECT 2")] == ["SELECT 1", "SELECT 2"]
    assert parse_statements(f"```sql\n{QUERY}\n```") is None
    assert parse_statements("  ```\nDELETE FROM singer\n```") is None
    assert single_query(f"```sql\n{QUERY}\n```") is None


@pytest.mark.parametrize("variant", [
    "select name from singer where country = 'France'",  # keyword case, string quotes
    'SELECT  name\n  FROM singer\n WHERE country = "France";',  # whitespace, trailing semicolon
    'SELECT "name" FROM [singer] WHERE `country` = "France"',  # identifier quotes
    "SELECT name FROM singer -- French singers\nWHERE country = 'France'",  # a comment
])
def test_normalize_sql_ignores_whitespace_case_quotes_and_semicolon(variant):
    assert normalize_sql(variant) == normalize_sql(QUERY)
    assert exact_match(variant, QUERY)


@pytest.mark.parametrize("different", [
    "SELECT name FROM singer WHERE country = 'Spain'",  # another literal
    "SELECT name FROM singer WHERE country = 'france'",  # literal case counts
    "SELECT T1.name FROM singer AS T1 WHERE T1.country = 'France'",  # an alias counts (execution match forgives it)
    "SELECT name FROM singer WHERE country <> 'France'",
])
def test_normalize_sql_keeps_what_changes_meaning_or_text(different):
    assert not exact_match(different, QUERY)


def test_normalize_sql_turns_double_quoted_values_into_strings():
    assert normalize_sql('SELECT a FROM t WHERE b IN ("x", 2) AND c BETWEEN "p" AND "q"') == \
        """SELECT "a" FROM "t" WHERE "b" IN ('x', 2) AND "c" BETWEEN 'p' AND 'q'"""


def test_normalize_sql_of_non_sql_collapses_whitespace():
    assert normalize_sql("  I  cannot\n answer that; ") == "I cannot answer that"


def test_parse_schema_reads_create_table_statements():
    tables = parse_schema("CREATE TABLE singer (name VARCHAR, age INTEGER); CREATE TABLE band (id INTEGER)")
    assert tables == [Table("singer", (("name", "TEXT"), ("age", "INTEGER"))), Table("band", (("id", "INTEGER"),))]
    assert parse_schema("CREATE TABLE t (a INTEGER); SELECT 1") is None
    assert parse_schema("not sql at all (") is None


def test_comparisons_cover_in_lists_and_between_bounds():
    query = single_query("SELECT a FROM t WHERE b = 1 AND c IN (2, 3) AND d BETWEEN 4 AND 5 AND e IN (SELECT 6)")
    assert sorted((left.name, right.sql()) for _, left, right in comparisons(query)) == \
        [("b", "1"), ("c", "2"), ("c", "3"), ("d", "4"), ("d", "5")]
