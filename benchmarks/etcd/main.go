// etcdload: the workload of `ckv bench`, against etcd, for
// benchmarks/etcd_compare.py.
//
// Closed loop: CONCURRENCY goroutines, each with one request outstanding,
// on random keys among KEYS (named as `ckv bench` names them) with one
// random VALUE-SIZE-byte value, for DURATION.  A request that fails or
// takes longer than TIMEOUT counts as an error, and its goroutine waits
// 10 ms before the next (as `ckv bench` does).  The
// read workload preloads every key first (as `ckv bench` does) and reads
// linearizably (etcd's default).  Requests go to the leader, etcd's best
// case (a follower forwards writes to the leader and asks it before a
// linearizable read), unless -all-members spreads them over every endpoint.
// Prints one JSON object with the fields that `ckv bench --json` uses for
// the same figures (percentiles by nearest rank, as there).
//
// Built against Debian's etcd sources (package golang-etcd-server-dev) with
// GO111MODULE=off; etcd_compare.py does that.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"math/rand"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/clientv3"
)

func key(i int) string { return fmt.Sprintf("bench-%08d", i) }

// percentile is the nearest-rank percentile (0 < p <= 100) of sorted.
func percentile(sorted []time.Duration, p float64) float64 {
	rank := int(math.Ceil(p*float64(len(sorted))/100 - 1e-9))
	if rank < 1 {
		rank = 1
	}
	if rank > len(sorted) {
		rank = len(sorted)
	}
	return float64(sorted[rank-1].Microseconds()) / 1000
}

// findLeader returns the endpoint of the member that is the leader now.
func findLeader(cli *clientv3.Client, endpoints []string) string {
	for _, ep := range endpoints {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := cli.Status(ctx, ep)
		cancel()
		if err == nil && st.Header.MemberId == st.Leader {
			return ep
		}
	}
	fmt.Fprintln(os.Stderr, "etcdload: no endpoint is the leader")
	os.Exit(1)
	return ""
}

func main() {
	endpoints := flag.String("endpoints", "127.0.0.1:2379", "client URLs, comma-separated")
	conc := flag.Int("concurrency", 32, "requests in flight")
	dur := flag.Duration("duration", 10*time.Second, "how long the workload runs")
	keys := flag.Int("keys", 10000, "key space")
	valSize := flag.Int("value-size", 100, "bytes per value")
	workload := flag.String("workload", "write", "write or read")
	timeout := flag.Duration("timeout", 5*time.Second, "per request")
	all := flag.Bool("all-members", false,
		"spread requests over every endpoint (followers forward to the leader) "+
			"instead of sending them all to the leader, etcd's best case")
	flag.Parse()

	cli, err := clientv3.New(clientv3.Config{
		Endpoints: strings.Split(*endpoints, ","), DialTimeout: 5 * time.Second,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "etcdload:", err)
		os.Exit(1)
	}
	raw := make([]byte, *valSize)
	rand.Read(raw)
	val := string(raw)

	// Wait for a leader: the first put that succeeds, within 30 s.
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err = cli.Put(ctx, key(0), val)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			fmt.Fprintln(os.Stderr, "etcdload: no leader within 30 s:", err)
			os.Exit(1)
		}
		time.Sleep(100 * time.Millisecond)
	}

	if !*all {
		leader := findLeader(cli, strings.Split(*endpoints, ","))
		cli.Close()
		cli, err = clientv3.New(clientv3.Config{Endpoints: []string{leader}, DialTimeout: 5 * time.Second})
		if err != nil {
			fmt.Fprintln(os.Stderr, "etcdload:", err)
			os.Exit(1)
		}
	}
	defer func() { cli.Close() }()

	if *workload == "read" {
		var next int64 = -1
		var wg sync.WaitGroup
		for g := 0; g < *conc; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := int(atomic.AddInt64(&next, 1)); i < *keys; i = int(atomic.AddInt64(&next, 1)) {
					ctx, cancel := context.WithTimeout(context.Background(), *timeout)
					_, err := cli.Put(ctx, key(i), val)
					cancel()
					if err != nil {
						fmt.Fprintln(os.Stderr, "etcdload: preload:", err)
						os.Exit(1)
					}
				}
			}()
		}
		wg.Wait()
	}

	var mu sync.Mutex
	var lats []time.Duration
	errs := 0
	var wg sync.WaitGroup
	start := time.Now()
	end := start.Add(*dur)
	for g := 0; g < *conc; g++ {
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed))
			local := make([]time.Duration, 0, 1<<16)
			e := 0
			for time.Now().Before(end) {
				k := key(r.Intn(*keys))
				t0 := time.Now()
				ctx, cancel := context.WithTimeout(context.Background(), *timeout)
				var err error
				if *workload == "read" {
					_, err = cli.Get(ctx, k)
				} else {
					_, err = cli.Put(ctx, k, val)
				}
				cancel()
				if err != nil {
					e++
					time.Sleep(10 * time.Millisecond)
					continue
				}
				local = append(local, time.Since(t0))
			}
			mu.Lock()
			lats = append(lats, local...)
			errs += e
			mu.Unlock()
		}(int64(g))
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	if len(lats) == 0 {
		fmt.Fprintln(os.Stderr, "etcdload: no request succeeded")
		os.Exit(1)
	}
	sort.Slice(lats, func(i, j int) bool { return lats[i] < lats[j] })
	json.NewEncoder(os.Stdout).Encode(map[string]any{
		"workload": *workload, "ops": len(lats), "ops_per_s": float64(len(lats)) / elapsed,
		"p50_ms": percentile(lats, 50), "p99_ms": percentile(lats, 99),
		"p999_ms": percentile(lats, 99.9), "errors": errs,
		"concurrency": *conc, "duration_s": elapsed, "all_members": *all,
	})
}
