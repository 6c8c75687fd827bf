// Prints the msgpack bytes go-cty writes for the values the harness's
// cty encoder is checked against (tests/src/nomad/cty.rs, golden tests).
//
// Run with Debian's packages (golang-go, golang-github-zclconf-go-cty-dev,
// golang-github-vmihailenco-msgpack.v5-dev), in GOPATH mode:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go run tests/src/nomad/cty_golden.go
package main

import (
	"encoding/hex"
	"fmt"
	"math/big"
	"strings"

	"github.com/zclconf/go-cty/cty"
	ctymsgpack "github.com/zclconf/go-cty/cty/msgpack"
)

var taskType = cty.Object(map[string]cty.Type{
	"image_source":      cty.String,
	"image_path":        cty.String,
	"checksum":          cty.String,
	"accelerator":       cty.String,
	"kvm_fallback":      cty.Bool,
	"host_port":         cty.Number,
	"guest_port":        cty.Number,
	"port_map":          cty.List(cty.Map(cty.Number)),
	"graceful_shutdown": cty.Bool,
	"args":              cty.List(cty.String),
	"machine_type":      cty.String,
	"drive_interface":   cty.String,
	"ready_serial":      cty.String,
	"ready_timeout_s":   cty.Number,
	"ready_check":       cty.String,
	"emulator":          cty.String,
})

var policyType = cty.Object(map[string]cty.Type{
	"module":    cty.String,
	"sha256":    cty.String,
	"settings":  cty.String,
	"time_ms":   cty.Number,
	"memory_mb": cty.Number,
})

var pluginType = cty.Object(map[string]cty.Type{
	"config":               cty.String,
	"state_dir":            cty.String,
	"cache_dir":            cty.String,
	"fingerprint_period_s": cty.Number,
	"policy":               cty.List(policyType),
})

// object fills every attribute of ty that set leaves out with null, as
// hcldec does for an optional attribute the job does not set.
func object(ty cty.Type, set map[string]cty.Value) cty.Value {
	attrs := map[string]cty.Value{}
	for name, aty := range ty.AttributeTypes() {
		if v, ok := set[name]; ok {
			attrs[name] = v
		} else {
			attrs[name] = cty.NullVal(aty)
		}
	}
	return cty.ObjectVal(attrs)
}

func show(name string, v cty.Value, ty cty.Type) {
	b, err := ctymsgpack.Marshal(v, ty)
	if err != nil {
		panic(err)
	}
	fmt.Printf("%s %s\n", name, hex.EncodeToString(b))
}

func main() {
	for _, n := range []int64{0, 127, 128, 255, 256, 65535, 65536, 4294967295, 4294967296, 9223372036854775807,
		-1, -32, -33, -128, -129, -32768, -32769, -2147483648, -2147483649, -9223372036854775808} {
		show(fmt.Sprintf("int(%d)", n), cty.NumberIntVal(n), cty.Number)
	}
	for _, f := range []float64{256.0, -40.0, 1.5, 0.25, 9223372036854775808.0} {
		show(fmt.Sprintf("float(%v)", f), cty.NumberFloatVal(f), cty.Number)
	}
	// A literal in a job is parsed at 512 bits: 0.1 is no float64.
	point1, _ := cty.ParseNumberVal("0.1")
	show("hcl(0.1)", point1, cty.Number)
	show("bigint(2^64)", cty.NumberVal(new(big.Float).SetInt(new(big.Int).Lsh(big.NewInt(1), 64))), cty.Number)
	for _, n := range []int{31, 32, 256} {
		show(fmt.Sprintf("str(%d)", n), cty.StringVal(strings.Repeat("a", n)), cty.String)
	}
	show("task(accelerator)", object(taskType, map[string]cty.Value{"accelerator": cty.StringVal("tcg")}), taskType)
	show("task(full)", object(taskType, map[string]cty.Value{
		"image_source":      cty.StringVal("http://127.0.0.1:8000/guest.iso"),
		"checksum":          cty.StringVal("md5:0123456789abcdef0123456789abcdef"),
		"accelerator":       cty.StringVal("tcg"),
		"kvm_fallback":      cty.False,
		"host_port":         cty.NumberIntVal(20000),
		"guest_port":        cty.NumberIntVal(8080),
		"port_map":          cty.ListVal([]cty.Value{cty.MapVal(map[string]cty.Value{"http": cty.NumberIntVal(8080), "admin": cty.NumberIntVal(8081)})}),
		"graceful_shutdown": cty.True,
		"args":              cty.ListVal([]cty.Value{cty.StringVal("-nodefaults"), cty.StringVal("-no-user-config")}),
		"ready_timeout_s":   cty.NumberIntVal(280),
	}), taskType)
	show("plugin(empty)", object(pluginType, map[string]cty.Value{"policy": cty.ListValEmpty(policyType)}), pluginType)
	show("plugin(policy)", object(pluginType, map[string]cty.Value{
		"config":               cty.StringVal("/etc/qemu-executor.toml"),
		"fingerprint_period_s": cty.NumberIntVal(1),
		"policy": cty.ListVal([]cty.Value{object(policyType, map[string]cty.Value{
			"module":   cty.StringVal("/p.wasm"),
			"settings": cty.StringVal(`{"min":1024}`),
			"time_ms":  cty.NumberIntVal(500),
		})}),
	}), pluginType)
}
