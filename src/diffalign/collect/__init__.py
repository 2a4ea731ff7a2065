"""Collect your own preferences: generate candidates, label pairs in a local web page, export training tables.

    diffalign collect serve --model toy --prompts toy:train --max_prompts 20 --per_prompt 2 --out labels/
    diffalign collect export labels/        # -> labels/preferences.parquet, labels/kto.parquet

`candidates` makes the images and the pair queue, `store` keeps every click durably (SQLite), `app` serves the page
and its API, `quality` measures agreement, `export` writes Pick-a-Pic-schema tables.
"""
