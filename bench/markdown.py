"""Print the results and ratios of a benchmark run as Markdown tables.

    python -m bench.markdown OUTPUT/results.json [MORE/results.json ...]

Rows of later files replace rows of earlier ones with the same case, target
and client count, so that a partial rerun can amend a full run. The ratios
are computed again from the merged rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import drivers, report


def load_results(paths: list[Path]) -> list[report.Result]:
    rows: dict[tuple[str, str, int], report.Result] = {}
    for path in paths:
        for item in json.loads(path.read_text())["results"]:
            fields = {name: item[name] for name in drivers.Measurement.__dataclass_fields__}
            result = report.Result(item["case"], item["target"], item["clients"], drivers.Measurement(**fields))
            rows[(result.case, result.target, result.clients)] = result
    return list(rows.values())


def markdown_table(header: list[str], rows: list[list[str]], numeric_from: int) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if index >= numeric_from else "---" for index in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    results = load_results([Path(argument) for argument in argv])
    order = {(case, target): index for index, (case, target) in enumerate(
        (case, target) for case in report.workloads.CASES for target in report.workloads.TARGETS)}
    results.sort(key=lambda result: (order[(result.case, result.target)] // len(report.workloads.TARGETS),
                                     result.clients, order[(result.case, result.target)]))
    print(markdown_table(report.TABLE_COLUMNS, [result.row() for result in results], numeric_from=2))
    clients_list = sorted({result.clients for result in results})
    ratios = report.compute_ratios(results, clients_list)
    print()
    header = ["ratio of ops/s", "target", *[f"clients={clients}" for clients in clients_list]]
    rows = []
    for ratio in ratios:
        cells = [ratio["label"], f">= {ratio['target']}x" if ratio["target"] else "-"]
        for clients in clients_list:
            value = ratio["values"][clients]
            cells.append("n/a" if value is None else f"{value:.2f}x")
        rows.append(cells)
    print(markdown_table(header, rows, numeric_from=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
