# Two qemu tasks and a docker one: which qemu task runs must be named.
job "pair" {
  group "front" {
    task "proxy" {
      driver = "docker"

      config {
        image = "nginx:1.27"
      }
    }

    task "vm" {
      driver = "qemu"

      config {
        image_source = "http://www.example.com/artifacts/front.iso"
        checksum     = "a5e836985934c3392cbbd9b643e5c1f7"
        host_port    = "8080"
        guest_port   = "80"
      }
    }
  }

  group "back" {
    task "vm" {
      driver = "qemu"

      config {
        image_source = "http://www.example.com/artifacts/back.iso"
        checksum     = "a5e836985934c3392cbbd9b643e5c1f7"
        host_port    = "9090"
        guest_port   = "80"
      }
    }
  }
}
