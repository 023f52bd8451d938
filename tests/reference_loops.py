"""Plain-Python reference loops shared by several method tests (independent of the code under test)."""

from __future__ import annotations

import math


def dtw_reference(cost: list[list[float]]) -> list[tuple[int, int]]:
    """DTW written plainly (DSKD's and CDM's reference): full DP with inf borders, backtrack diag > up > left."""
    n, m = len(cost), len(cost[0])
    acc = [[math.inf] * (m + 1) for _ in range(n + 1)]
    acc[0][0] = 0.0
    for i in range(n):
        for j in range(m):
            acc[i + 1][j + 1] = cost[i][j] + min(acc[i][j + 1], acc[i + 1][j], acc[i][j])
    i, j, path = n - 1, m - 1, []
    while i > 0 or j > 0:
        path.append((i, j))
        options = [
            acc[i][j] if i > 0 and j > 0 else math.inf,
            acc[i][j + 1] if i > 0 else math.inf,
            acc[i + 1][j] if j > 0 else math.inf,
        ]
        move = options.index(min(options))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    path.append((0, 0))
    return path[::-1]
