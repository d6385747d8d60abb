-- GET wrk's URL (the baselines B0 and B1); wrk's default request, named for the results table.
--   wrk -s bench/lua/get.lua URL
wrk.method = "GET"
