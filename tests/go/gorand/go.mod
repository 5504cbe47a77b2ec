module zygote.invalid/gorand

go 1.19
