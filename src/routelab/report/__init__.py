"""The aggregate and report stages: tidy tables across runs (:mod:`.aggregate`), their statistics
(:mod:`.statistics`), the comparison tables (:mod:`.tables`), the cross-run figures (:mod:`.figures`)
and the report page (:mod:`.page`), put together by :func:`routelab.report.build.write_report`.
"""
