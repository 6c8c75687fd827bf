# The original qemu driver, as its first documentation showed it: the
# driver fetched the image itself over HTTP and checked it against a bare
# MD5, and forwarded one host port to one guest port, every value a
# string. The job around it is the job specification's own example of
# that time, with the qemu task in place of its docker one.
job "my-service" {
  region      = "us"
  datacenters = ["us-west-1", "us-east-1"]
  type        = "service"
  priority    = 50

  constraint {
    attribute = "$attr.kernel.name"
    value     = "linux"
  }

  update {
    stagger      = "10s"
    max_parallel = 1
  }

  group "webs" {
    count = 5

    task "linux" {
      driver = "qemu"

      config {
        image_source = "http://www.example.com/artifacts/linux-0.1.iso"
        checksum     = "a5e836985934c3392cbbd9b643e5c1f7"
        accelerator  = "kvm"
        host_port    = "8080"
        guest_port   = "8081"
      }

      resources {
        cpu    = 500
        memory = 512

        network {
          mbits = 100
        }
      }
    }
  }
}
