module oauth-proxy/bench

go 1.26
