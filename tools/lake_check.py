#!/usr/bin/env python3
"""Independent checks of the lake: reads the Iceberg tables with pyiceberg (Glue catalog) and
queries them with DuckDB's iceberg extension, both pointed at an AWS-compatible endpoint.

  lake_check.py scan  --endpoint URL --database DB --table T [--table T2 ...]
  lake_check.py query --endpoint URL --database DB [--sql-dir sql] [--file F.sql ...]
  lake_check.py export --endpoint URL --database DB --out DIR [--table T ...]

Prints one JSON document on stdout. Used by the integration tests and the local pipeline.
"""
import argparse
import glob
import json
import os
import sys


def aws_env(endpoint):
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def glue_catalog(endpoint):
    from pyiceberg.catalog import load_catalog

    return load_catalog(
        "adpipe",
        **{
            "type": "glue",
            "glue.endpoint": endpoint,
            "glue.region": "us-east-1",
            "glue.access-key-id": "test",
            "glue.secret-access-key": "test",
            "s3.endpoint": endpoint,
            "s3.region": "us-east-1",
            "s3.access-key-id": "test",
            "s3.secret-access-key": "test",
            "s3.force-virtual-addressing": "false",
        },
    )


def jsonable(v):
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


def scan(args):
    catalog = glue_catalog(args.endpoint)
    out = {}
    for name in args.table:
        table = catalog.load_table(f"{args.database}.{name}")
        arrow = table.scan().to_arrow()
        rows = [{k: jsonable(v) for k, v in r.items()} for r in arrow.to_pylist()]
        out[name] = {
            "rows": rows,
            "schema": [
                {"id": f.field_id, "name": f.name, "type": str(f.field_type), "required": f.required}
                for f in table.schema().fields
            ],
            "partition_spec": [
                {"name": f.name, "transform": str(f.transform)} for f in table.spec().fields
            ],
            "format_version": table.metadata.format_version,
            "snapshots": [
                {k: v for k, v in s.summary.additional_properties.items() if k.startswith("adpipe.")}
                for s in table.metadata.snapshots
            ],
            "data_files": sum(1 for _ in table.scan().plan_files()),
        }
    return out


def load_extension(con, module, name):
    import importlib

    mod = importlib.import_module(module)
    base = os.path.join(os.path.dirname(mod.__file__), "extensions")
    found = glob.glob(os.path.join(base, "**", f"{name}.duckdb_extension"), recursive=True)
    if not found:
        sys.exit(f"lake_check: {name}.duckdb_extension not found in {base}")
    con.execute(f"LOAD '{found[0]}'")


def query(args):
    import boto3
    import duckdb

    glue = boto3.client("glue", endpoint_url=args.endpoint, region_name="us-east-1")
    con = duckdb.connect(config={"allow_unsigned_extensions": "true", "autoinstall_known_extensions": "false", "autoload_known_extensions": "false"})
    for module, name in [("duckdb_extension_httpfs", "httpfs"), ("duckdb_extension_avro", "avro"), ("duckdb_extension_iceberg", "iceberg")]:
        load_extension(con, module, name)
    host = args.endpoint.split("://", 1)[1]
    con.execute(
        f"CREATE SECRET lake (TYPE s3, KEY_ID 'test', SECRET 'test', REGION 'us-east-1', "
        f"ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false)"
    )
    for t in glue.get_tables(DatabaseName=args.database)["TableList"]:
        location = t["Parameters"]["metadata_location"]
        con.execute(f"CREATE VIEW {t['Name']} AS SELECT * FROM iceberg_scan('{location}')")
    files = args.file or sorted(glob.glob(os.path.join(args.sql_dir, "*.sql")))
    out = {}
    for path in files:
        sql = open(path).read().strip().rstrip(";")
        rel = con.execute(sql)
        cols = [d[0] for d in rel.description]
        out[os.path.basename(path)] = {
            "columns": cols,
            "rows": [[jsonable(v) for v in row] for row in rel.fetchall()],
        }
    return out


def export(args):
    """Writes each table (all of them by default) as one zstd Parquet file, read by pyiceberg."""
    import pyarrow.parquet as pq

    catalog = glue_catalog(args.endpoint)
    names = args.table or sorted(ident[-1] for ident in catalog.list_tables(args.database))
    os.makedirs(args.out, exist_ok=True)
    out = {}
    for name in names:
        arrow = catalog.load_table(f"{args.database}.{name}").scan().to_arrow()
        path = os.path.join(args.out, f"{name}.parquet")
        pq.write_table(arrow, path, compression="zstd")
        out[name] = {"path": os.path.abspath(path), "rows": arrow.num_rows, "columns": arrow.column_names}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["scan", "query", "export"])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--database", required=True)
    p.add_argument("--table", action="append", default=[])
    p.add_argument("--sql-dir", default=os.path.join(os.path.dirname(__file__), "..", "sql"))
    p.add_argument("--file", action="append", default=[])
    p.add_argument("--out", default="lake-export")
    args = p.parse_args()
    aws_env(args.endpoint)
    result = {"scan": scan, "query": query, "export": export}[args.mode](args)
    json.dump(result, sys.stdout, default=str)


if __name__ == "__main__":
    main()
