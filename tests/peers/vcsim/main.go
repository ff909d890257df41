// Command vcsim serves govmomi's vCenter simulator (simulator.VPX) for powerq's vmware tests.
//
// It builds offline against Debian's golang-github-vmware-govmomi-dev
// (GO111MODULE=off GOPATH=...:/usr/share/gocode go build); tests/peers/vcsim.py builds and runs it.
//
// The vSphere SOAP API is served on -listen (http, or https with a self-signed certificate
// written to -certfile when -tls is set); the simulator itself keeps every VM's state. On top:
//
//   - a counting hook: every SOAP request is read before the simulator gets it, and calls of
//     PowerOnVM_Task (on), PowerOffVM_Task (off), ShutdownGuest (soft_off), ResetVM_Task
//     (reset), RebootGuest (cycle), ReconfigVM_Task (boot), Fetch or RetrieveProperties(Ex)
//     of a VM's runtime (query) are counted per VM, plus Login (sessions) and Login minus Logout
//     (open_sessions). Requests carrying the header X-Powerq-Peer-Control are the test's own
//     and are not counted.
//   - faults per VM: "busy" makes its power and reconfigure tasks fail with the vSphere fault
//     TaskInProgress (the VM is wrapped in a type overriding those methods); "slow" delays
//     every request that names the VM by -latency seconds. "auth" is server-wide: logins are
//     refused (InvalidLogin) until it is cleared, as when an account's password was changed.
//   - a JSON control endpoint on -control: GET /vms, POST /fault {"vm","fault","latency"},
//     POST /auth {"refuse": bool}, POST /reset (zero counts).
//
// On start it prints one JSON line {"sdk": URL, "control": URL} on stdout. It exits on
// SIGTERM / SIGINT or when stdin closes (so it never outlives its parent), removing the
// simulator's temporary datastore directories.
package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"reflect"
	"regexp"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const controlHeader = "X-Powerq-Peer-Control"

var countKeys = []string{"on", "off", "soft_off", "cycle", "reset", "boot", "query"}

var methodKey = map[string]string{
	"PowerOnVM_Task":  "on",
	"PowerOffVM_Task": "off",
	"ShutdownGuest":   "soft_off",
	"RebootGuest":     "cycle",
	"ResetVM_Task":    "reset",
	"ReconfigVM_Task": "boot",
}

var (
	reMethod   = regexp.MustCompile(`<(?:[\w-]+:)?Body[^>]*>\s*<(?:[\w-]+:)?(\w+)[\s>/]`)
	reThis     = regexp.MustCompile(`<(?:[\w-]+:)?_this[^>]*>([^<]+)<`)
	reVMObj    = regexp.MustCompile(`<(?:[\w-]+:)?obj[^>]*type="VirtualMachine"[^>]*>([^<]+)<`)
	reRuntime  = regexp.MustCompile(`<(?:[\w-]+:)?(?:pathSet|prop)[^>]*>(?:summary\.)?runtime`)
	reAllProps = regexp.MustCompile(`<(?:[\w-]+:)?all>true<`)
)

// state is everything the hook and the control endpoint share.
type state struct {
	mu       sync.Mutex
	names    map[string]string // moref value -> VM name
	counts   map[string]map[string]int
	faults   map[string]string
	latency  map[string]float64
	holders  map[string]types.ManagedObjectReference // VM moref -> its busy "holder" task
	sessions int
	open     int
	user     string
	pass     string
	svc      *simulator.Service
}

func (s *state) vmFault(moref string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.faults[s.names[moref]]
}

// busyVM is a simulated VM whose power and reconfigure tasks fail with TaskInProgress while
// its fault is "busy". It embeds the simulator's VM by value so that the property collector
// still finds the managed-object fields.
type busyVM struct {
	simulator.VirtualMachine
	st *state
}

func (vm *busyVM) busy() bool { return vm.st.vmFault(vm.Self.Value) == "busy" }

// holder is the (never finishing) task that keeps a busy VM busy, as TaskInProgress names it.
func (vm *busyVM) holder() types.ManagedObjectReference {
	vm.st.mu.Lock()
	defer vm.st.mu.Unlock()
	ref, ok := vm.st.holders[vm.Self.Value]
	if !ok {
		ref = simulator.CreateTask(vm.Self, "reconfigVm", nil).Self
		vm.st.holders[vm.Self.Value] = ref
	}
	return ref
}

func busyTask(vm *busyVM, name string) types.ManagedObjectReference {
	holder := vm.holder()
	task := simulator.CreateTask(vm.Self, name, func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, &types.TaskInProgress{Task: holder}
	})
	return task.Run()
}

func (vm *busyVM) PowerOnVMTask(ctx *simulator.Context, req *types.PowerOnVM_Task) soap.HasFault {
	if vm.busy() {
		return &methods.PowerOnVM_TaskBody{Res: &types.PowerOnVM_TaskResponse{Returnval: busyTask(vm, "powerOn")}}
	}
	return vm.VirtualMachine.PowerOnVMTask(ctx, req)
}

func (vm *busyVM) PowerOffVMTask(ctx *simulator.Context, req *types.PowerOffVM_Task) soap.HasFault {
	if vm.busy() {
		return &methods.PowerOffVM_TaskBody{Res: &types.PowerOffVM_TaskResponse{Returnval: busyTask(vm, "powerOff")}}
	}
	return vm.VirtualMachine.PowerOffVMTask(ctx, req)
}

func (vm *busyVM) ResetVMTask(ctx *simulator.Context, req *types.ResetVM_Task) soap.HasFault {
	if vm.busy() {
		return &methods.ResetVM_TaskBody{Res: &types.ResetVM_TaskResponse{Returnval: busyTask(vm, "reset")}}
	}
	return vm.VirtualMachine.ResetVMTask(ctx, req)
}

func (vm *busyVM) ReconfigVMTask(ctx *simulator.Context, req *types.ReconfigVM_Task) soap.HasFault {
	if vm.busy() {
		return &methods.ReconfigVM_TaskBody{Res: &types.ReconfigVM_TaskResponse{Returnval: busyTask(vm, "reconfigVm")}}
	}
	return vm.VirtualMachine.ReconfigVMTask(ctx, req)
}

func (vm *busyVM) ShutdownGuest(ctx *simulator.Context, req *types.ShutdownGuest) soap.HasFault {
	if vm.busy() {
		return &methods.ShutdownGuestBody{Fault_: simulator.Fault("", &types.TaskInProgress{Task: vm.holder()})}
	}
	return vm.VirtualMachine.ShutdownGuest(ctx, req)
}

type recorder struct {
	http.ResponseWriter
	status int
}

func (r *recorder) WriteHeader(code int) {
	r.status = code
	r.ResponseWriter.WriteHeader(code)
}

// hook counts and delays SOAP requests, then hands them to the simulator.
func (s *state) hook(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.Header.Get(controlHeader) != "" {
			next.ServeHTTP(w, r)
			return
		}
		body, err := ioutil.ReadAll(r.Body)
		_ = r.Body.Close()
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		r.Body = ioutil.NopCloser(bytes.NewReader(body))
		method := ""
		if m := reMethod.FindSubmatch(body); m != nil {
			method = string(m[1])
		}
		var vms []string
		key := methodKey[method]
		if key != "" {
			if m := reThis.FindSubmatch(body); m != nil {
				vms = append(vms, string(m[1]))
			}
		} else if method == "Fetch" && reRuntime.Match(body) {
			// pyVmomi reads vm.runtime with the internal Fetch method, _this = the VM.
			key = "query"
			if m := reThis.FindSubmatch(body); m != nil {
				vms = append(vms, string(m[1]))
			}
		} else if method == "RetrieveProperties" || method == "RetrievePropertiesEx" {
			if reRuntime.Match(body) || reAllProps.Match(body) {
				key = "query"
				for _, m := range reVMObj.FindAllSubmatch(body, -1) {
					vms = append(vms, string(m[1]))
				}
			}
		}
		delay := 0.0
		s.mu.Lock()
		for _, ref := range vms {
			name, ok := s.names[ref]
			if !ok {
				continue
			}
			s.counts[name][key]++
			if s.faults[name] == "slow" && s.latency[name] > delay {
				delay = s.latency[name]
			}
		}
		s.mu.Unlock()
		if delay > 0 {
			time.Sleep(time.Duration(delay * float64(time.Second)))
		}
		rec := &recorder{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(rec, r)
		s.mu.Lock()
		switch method {
		case "Login":
			if rec.status == http.StatusOK {
				s.sessions++
				s.open++
			}
		case "Logout":
			if rec.status == http.StatusOK && s.open > 0 {
				s.open--
			}
		}
		s.mu.Unlock()
	})
}

func (s *state) control() http.Handler {
	mux := http.NewServeMux()
	reply := func(w http.ResponseWriter, code int, v interface{}) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(v)
	}
	mux.HandleFunc("/vms", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		defer s.mu.Unlock()
		out := map[string]interface{}{}
		for ref, name := range s.names {
			counts := map[string]int{}
			for k, v := range s.counts[name] {
				counts[k] = v
			}
			counts["sessions"] = s.sessions
			counts["open_sessions"] = s.open
			out[name] = map[string]interface{}{
				"moref": ref, "counts": counts, "fault": s.faults[name], "latency": s.latency[name],
			}
		}
		reply(w, http.StatusOK, out)
	})
	mux.HandleFunc("/fault", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			VM      string  `json:"vm"`
			Fault   string  `json:"fault"`
			Latency float64 `json:"latency"`
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			reply(w, http.StatusBadRequest, map[string]string{"error": "bad json"})
			return
		}
		if req.Fault != "none" && req.Fault != "busy" && req.Fault != "slow" {
			reply(w, http.StatusBadRequest, map[string]string{"error": "fault must be none, busy or slow"})
			return
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if _, ok := s.counts[req.VM]; !ok {
			reply(w, http.StatusNotFound, map[string]string{"error": "unknown vm"})
			return
		}
		s.faults[req.VM] = req.Fault
		s.latency[req.VM] = req.Latency
		reply(w, http.StatusOK, map[string]bool{"ok": true})
	})
	mux.HandleFunc("/auth", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Refuse bool `json:"refuse"`
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			reply(w, http.StatusBadRequest, map[string]string{"error": "bad json"})
			return
		}
		pass := s.pass
		if req.Refuse {
			pass = s.pass + "-changed-by-peer"
		}
		// The simulator's SessionManager checks logins against Service.Listen.User.
		s.svc.Listen.User = url.UserPassword(s.user, pass)
		reply(w, http.StatusOK, map[string]bool{"ok": true})
	})
	mux.HandleFunc("/reset", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		defer s.mu.Unlock()
		for name := range s.counts {
			s.counts[name] = map[string]int{}
		}
		s.sessions = 0
		reply(w, http.StatusOK, map[string]bool{"ok": true})
	})
	mux.HandleFunc("/ping", func(w http.ResponseWriter, r *http.Request) {
		reply(w, http.StatusOK, map[string]bool{"ok": true})
	})
	return mux
}

// selfSigned makes a TLS certificate for 127.0.0.1 / localhost and writes it (PEM) to certFile.
func selfSigned(certFile string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "vcsim.powerq.test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, &tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	if certFile != "" {
		pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
		if err := ioutil.WriteFile(certFile, pemBytes, 0o644); err != nil {
			return tls.Certificate{}, err
		}
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address of the vSphere API")
	controlAddr := flag.String("control", "127.0.0.1:0", "address of the JSON control endpoint")
	hosts := flag.Int("hosts", 1, "hosts in the cluster")
	vms := flag.Int("vms", 2, "virtual machines")
	prefix := flag.String("prefix", "vmw", "VM names are PREFIX-001, PREFIX-002, ...")
	user := flag.String("user", "powerq", "the one account the simulator accepts")
	pass := flag.String("pass", "", "its password (required)")
	useTLS := flag.Bool("tls", false, "serve https with a self-signed certificate")
	certFile := flag.String("certfile", "", "where to write that certificate (PEM)")
	flag.Parse()
	if *pass == "" {
		log.Fatal("-pass is required")
	}

	model := simulator.VPX()
	model.Host = 0
	model.ClusterHost = *hosts
	model.Machine = *vms
	model.Autostart = false
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()

	st := &state{
		names: map[string]string{}, counts: map[string]map[string]int{},
		faults: map[string]string{}, latency: map[string]float64{},
		holders: map[string]types.ManagedObjectReference{},
		user:    *user, pass: *pass, svc: model.Service,
	}
	found := simulator.Map.All("VirtualMachine")
	sort.Slice(found, func(i, j int) bool { return found[i].Reference().Value < found[j].Reference().Value })
	for i, e := range found {
		vm := e.(*simulator.VirtualMachine)
		name := fmt.Sprintf("%s-%03d", *prefix, i+1)
		vm.Name = name
		vm.Config.Name = name
		vm.Summary.Config.Name = name
		// The model gives every VM the same NIC object (one MAC address for all): give each
		// VM a copy of its own with a unique, VMware-style MAC address.
		for j, dev := range vm.Config.Hardware.Device {
			if _, ok := dev.(types.BaseVirtualEthernetCard); !ok {
				continue
			}
			clone := reflect.New(reflect.TypeOf(dev).Elem())
			clone.Elem().Set(reflect.ValueOf(dev).Elem())
			nic := clone.Interface().(types.BaseVirtualEthernetCard)
			nic.GetVirtualEthernetCard().MacAddress = fmt.Sprintf("00:50:56:%02x:%02x:%02x", ((i+1)>>16)&0xff, ((i+1)>>8)&0xff, (i+1)&0xff)
			vm.Config.Hardware.Device[j] = nic.(types.BaseVirtualDevice)
		}
		st.names[vm.Self.Value] = name
		st.counts[name] = map[string]int{}
		st.faults[name] = "none"
		simulator.Map.Put(&busyVM{VirtualMachine: *vm, st: st})
	}

	// The simulator's own listener (unused by clients) on a free port; it also fills in the
	// service URL and registers the SDK handlers on model.Service.ServeMux.
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(*user, *pass)}
	internal := model.Service.NewServer()
	defer internal.Close()

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	scheme := "http"
	if *useTLS {
		cert, err := selfSigned(*certFile)
		if err != nil {
			log.Fatal(err)
		}
		ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}})
		scheme = "https"
	}
	api := &http.Server{Handler: st.hook(model.Service.ServeMux)}
	go func() { _ = api.Serve(ln) }()

	cln, err := net.Listen("tcp", *controlAddr)
	if err != nil {
		log.Fatal(err)
	}
	ctl := &http.Server{Handler: st.control()}
	go func() { _ = ctl.Serve(cln) }()

	out, _ := json.Marshal(map[string]string{
		"sdk":     fmt.Sprintf("%s://%s/sdk", scheme, ln.Addr().String()),
		"control": fmt.Sprintf("http://%s", cln.Addr().String()),
	})
	fmt.Println(string(out))

	done := make(chan struct{})
	go func() {
		_, _ = io.Copy(ioutil.Discard, os.Stdin)
		close(done)
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-sig:
	case <-done:
	}
	_ = api.Close()
	_ = ctl.Close()
}
