// gorand: a long-running Go program that, like many real ones, seeds a
// math/rand source once at start-up from crypto/rand, then hands out values
// from it on request: each time the file <base>.req appears it is removed and
// one value is appended to <base>.out. Two copies of one process (two forks of
// a VM) print the same values; a restarted process prints new ones. It looks
// twice a second: on a PVM host every guest syscall is emulated, and two
// copies polling at 20 Hz (with the Go runtime's own wake-ups) kept the
// guest's one vCPU ~97% busy.
package main

import (
	crand "crypto/rand"
	"encoding/binary"
	"fmt"
	"math/rand"
	"os"
	"time"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: gorand BASE")
		os.Exit(2)
	}
	base := os.Args[1]
	var seed [8]byte
	if _, err := crand.Read(seed[:]); err != nil {
		panic(err)
	}
	r := rand.New(rand.NewSource(int64(binary.LittleEndian.Uint64(seed[:]))))
	out, err := os.OpenFile(base+".out", os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		panic(err)
	}
	fmt.Fprintf(out, "started %d\n", os.Getpid())
	for {
		if _, err := os.Stat(base + ".req"); err == nil {
			os.Remove(base + ".req")
			fmt.Fprintf(out, "value %d\n", r.Int63())
		}
		time.Sleep(500 * time.Millisecond)
	}
}
